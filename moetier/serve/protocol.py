"""The OpenAI request bodies as pydantic models (what ``/docs`` and ``/openapi.json`` show), and the
error body.

Types are strict (``"5"`` is not a number, ``true`` is not an integer): a wrong type is a 400 that
names the field. Fields OpenAI has and moetier does not implement are a 400 naming them when set
(:data:`NOT_IMPLEMENTED`); fields OpenAI does not have are ignored and logged (``extra``).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from ..openai_api import MAX_LOGPROBS, MAX_N, NOT_IMPLEMENTED  # noqa: F401 - the limits the docs state

Number = Union[StrictInt, StrictFloat]


class APIError(Exception):
    """An error sent to the client as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    include_usage: Optional[StrictBool] = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)
    name: StrictStr = "response"
    description: Optional[StrictStr] = None
    json_schema: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[StrictBool] = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``: exactly one of these."""

    model_config = ConfigDict(strict=True, extra="allow")
    json_: Optional[Union[dict[str, Any], StrictStr]] = Field(default=None, alias="json")
    regex: Optional[StrictStr] = None
    choice: Optional[list[StrictStr]] = None
    grammar: Optional[StrictStr] = None
    json_object: Optional[StrictBool] = None


class _Sampling(BaseModel):
    """Fields both endpoints share (OpenAI's, then vLLM's extras)."""

    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)
    model: StrictStr
    n: Optional[StrictInt] = Field(default=1, description=f"completions per prompt (at most {MAX_N})")
    temperature: Optional[Number] = 1.0
    top_p: Optional[Number] = 1.0
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[StrictInt] = None
    presence_penalty: Optional[Number] = 0.0
    frequency_penalty: Optional[Number] = 0.0
    logit_bias: Optional[dict[str, Number]] = None
    user: Optional[StrictStr] = None
    response_format: Optional[ResponseFormat] = None
    # vLLM's extras
    top_k: Optional[StrictInt] = -1
    min_tokens: Optional[StrictInt] = 0
    repetition_penalty: Optional[Number] = 1.0
    ignore_eos: Optional[StrictBool] = False
    stop_token_ids: Optional[list[StrictInt]] = None
    include_stop_str_in_output: Optional[StrictBool] = False
    skip_special_tokens: Optional[StrictBool] = True
    structured_outputs: Optional[StructuredOutputs] = None
    return_token_ids: Optional[StrictBool] = Field(
        default=False, description="vLLM's: the prompt's and the generated token ids in the answer (streamed: "
                                   "the prompt's in the first chunk, each chunk's own ids with it)")
    keep_alive: Optional[Union[Number, StrictStr]] = Field(
        default=None, description="Ollama's: how long the model stays loaded after this request "
                                  "(seconds, or '5m', '1h'; 0 unloads it right after; -1 forever)")


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: OpenAI's body, plus vLLM's sampling extras."""

    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of token-id lists")
    max_tokens: Optional[StrictInt] = 16
    logprobs: Optional[StrictInt] = Field(default=None, description=f"0..{MAX_LOGPROBS}")
    echo: Optional[StrictBool] = False
    best_of: Optional[StrictInt] = None
    suffix: Optional[StrictStr] = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    name: StrictStr
    description: Optional[StrictStr] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[StrictBool] = None


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    name: StrictStr


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[StrictStr, list[dict[str, Any]]]] = None
    name: Optional[StrictStr] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[StrictStr] = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: OpenAI's body, plus vLLM's sampling extras."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = None
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = False
    top_logprobs: Optional[StrictInt] = Field(default=None, description=f"0..{MAX_LOGPROBS}")
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[StrictBool] = None


class TokenizeRequest(BaseModel):
    """vLLM's ``POST /tokenize``: a ``prompt``, or chat ``messages`` rendered with the template."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: StrictStr
    prompt: Optional[StrictStr] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[StrictBool] = True
    add_generation_prompt: Optional[StrictBool] = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    model: StrictStr
    tokens: list[StrictInt]


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "moetier"
    loaded: bool
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Choice(BaseModel):
    index: int
    logprobs: Optional[dict[str, Any]] = None
    finish_reason: Optional[str] = None


class _Response(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage


class CompletionChoice(_Choice):
    text: str


class CompletionResponse(_Response):
    object: str = "text_completion"
    choices: list[CompletionChoice]


class ChatChoice(_Choice):
    message: dict[str, Any]


class ChatCompletionResponse(_Response):
    object: str = "chat.completion"
    choices: list[ChatChoice]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
