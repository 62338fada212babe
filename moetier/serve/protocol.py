"""Request parsing and response shapes of the OpenAI API, and its error body."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Optional

from ..batch_file import _check_prompt_shape, completion_body, sampling_params, usage
from ..runtime.sampling import SamplingParams


class APIError(Exception):
    """An error sent to the client as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    kind: str  # "chat" or "completion"
    model: str
    body: dict
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_request(body, kind: str, models: list[str]) -> ParsedRequest:
    """Check a request body; APIError (400, or 404 for an unknown model) says what is wrong."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "model must be a non-empty string", param="model", code="invalid_type"
                       if "model" in body else "missing_required_parameter")
    if model not in models:
        raise APIError(404, f"the model {model!r} does not exist; this server has {', '.join(models)}",
                       param="model", code="model_not_found")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, f"stream must be a boolean, got {stream!r}", param="stream", code="invalid_type")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options", code="invalid_type")
    rest = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    try:
        _check_prompt_shape(rest, kind)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e), param="messages" if kind == "chat" else "prompt") from None
    try:
        params = sampling_params(rest, kind)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e)) from None
    return ParsedRequest(kind, model, body, params, bool(stream), bool(opts.get("include_usage")))


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def response(req: ParsedRequest, rid: str, outs: list, prompt_tokens: int, tokenizer) -> dict:
    """The non-streamed response; ``outs`` are CompletionOutputs in index order."""
    return completion_body(req.kind, rid, req.model, outs, prompt_tokens, tokenizer)


def chunk(req: ParsedRequest, rid: str, index: int, text: Optional[str], finish_reason: Optional[str],
          first: bool = False, logprobs: Optional[dict] = None) -> dict:
    """One streamed chunk for choice ``index`` (``logprobs``: those of the tokens behind ``text``)."""
    if req.kind == "chat":
        delta: dict = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": req.model, "choices": [choice]}


def usage_chunk(req: ParsedRequest, rid: str, prompt_tokens: int, completion_tokens: int) -> dict:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": req.model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
