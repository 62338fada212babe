"""An OpenAI request body (completions or chat) as moetier's prompts and :class:`SamplingParams`.

Shared by the server (after pydantic has checked the types) and ``moetier batch`` (lines as they
are): one place maps ``max_tokens``, ``logprobs``, penalties, ``logit_bias``, ``response_format``,
``structured_outputs`` and ``tools`` to the engine's terms, and refuses what it cannot honour
with a :class:`ParamError` naming the parameter.
"""

from __future__ import annotations

import json
from typing import Optional

from .runtime.sampling import SamplingParams

MAX_N = 16
MAX_LOGPROBS = 20
MAX_PROMPTS = 64
NOT_IMPLEMENTED = {
    "completion": ("suffix",),
    "chat": ("audio", "modalities", "prediction", "web_search_options", "functions", "function_call",
             "reasoning_effort", "service_tier", "verbosity"),
}
ROLES = ("system", "developer", "user", "assistant", "tool")


class ParamError(ValueError):
    """A parameter that cannot be served as given; ``param`` names it, ``code`` is OpenAI's."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param, self.code = param, code


def _int(body: dict, key: str, default):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ParamError(f"{key} must be an integer, got {v!r}", key, "invalid_type")
    return v


def _num(body: dict, key: str, default) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ParamError(f"{key} must be a number, got {v!r}", key, "invalid_type")
    return float(v)


def check_shape(body: dict, kind: str) -> None:
    """The prompt part of the body (``messages`` or ``prompt``) has the right shape."""
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ParamError("messages must be a non-empty list", "messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ParamError(f"messages[{i}] needs a role", f"messages[{i}].role")
            if m["role"] not in ROLES:
                raise ParamError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m['role']!r}",
                                 f"messages[{i}].role")
            if "content" not in m and not m.get("tool_calls"):
                raise ParamError(f"messages[{i}] needs content", f"messages[{i}].content")
    else:
        prompts_of(body)


def prompts_of(body: dict) -> list:
    """A completions body's prompts: each a non-empty string or a non-empty list of token ids."""
    p = body.get("prompt")

    def tokens(x) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(p, str) and p:
        out = [p]
    elif tokens(p):
        out = [p]
    elif isinstance(p, list) and p and all((isinstance(x, str) and x) or tokens(x) for x in p):
        out = list(p)
    else:
        raise ParamError("prompt must be a non-empty string, a list of strings, a list of token ids or a "
                         "list of token-id lists", "prompt")
    if len(out) > MAX_PROMPTS:
        raise ParamError(f"prompt holds {len(out)} prompts; at most {MAX_PROMPTS} per request", "prompt")
    return out


def _unsupported(body: dict, kind: str) -> None:
    for k in NOT_IMPLEMENTED[kind]:
        if body.get(k) not in (None, "", [], {}):
            raise ParamError(f"{k} is an OpenAI parameter that moetier does not implement", k, "unsupported_parameter")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise ParamError(f"best_of must be 1 (moetier does not rank candidates), got {best_of!r}", "best_of",
                         "unsupported_parameter")


def echo_only(body: dict, kind: str) -> bool:
    """``echo`` with ``max_tokens: 0``: the answer is the prompt (and its logprobs) alone."""
    return kind == "completion" and bool(body.get("echo")) and body.get("max_tokens") == 0


def structured_of(body: dict) -> Optional[dict]:
    """``structured_outputs`` (vLLM) or ``response_format`` (OpenAI) as StructuredOutputsParams fields."""
    so, rf = body.get("structured_outputs"), body.get("response_format")
    if so is not None and rf not in (None, {"type": "text"}):
        raise ParamError("give structured_outputs or response_format, not both", "response_format")
    if so is not None:
        if not isinstance(so, dict):
            raise ParamError("structured_outputs must be an object", "structured_outputs")
        return so
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise ParamError("response_format.type must be text, json_object or json_schema", "response_format")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return {"json_object": True}
    js = rf.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
        raise ParamError("response_format json_schema needs json_schema.schema, an object",
                         "response_format.json_schema")
    return {"json": js["schema"]}


def sampling_params(body: dict, kind: str, tool_schema: Optional[dict] = None) -> SamplingParams:
    """The body's sampling fields as :class:`SamplingParams` (OpenAI defaults); ParamError if invalid.

    ``tool_schema``: the JSON schema a forced tool call must match (chat ``tool_choice`` required or
    a named function; see :mod:`moetier.serve.tools`).
    """
    _unsupported(body, kind)
    if body.get("stream") not in (None, False, True):
        raise ParamError(f"stream must be a boolean, got {body['stream']!r}", "stream", "invalid_type")
    if kind == "chat":
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = body.get(key)
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
            raise ParamError(f"{key} must be an integer, got {max_tokens!r}", key, "invalid_type")
    else:
        max_tokens = _int(body, "max_tokens", 16)
        if echo_only(body, kind):  # as vLLM: one token is generated for the prompt's logprobs, not returned
            max_tokens = 1
    n = _int(body, "n", 1)
    if not 1 <= n <= MAX_N:
        raise ParamError(f"n must be in [1, {MAX_N}], got {n}", "n")
    logprobs = None
    if kind == "chat":
        top = _int(body, "top_logprobs", None)
        if body.get("logprobs"):
            logprobs = top or 0
        elif top:
            raise ParamError("top_logprobs needs logprobs: true", "top_logprobs")
        lp_key = "top_logprobs"
    else:
        logprobs = _int(body, "logprobs", None)
        lp_key = "logprobs"
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise ParamError(f"{lp_key} must be in [0, {MAX_LOGPROBS}], got {logprobs}", lp_key)
    temperature = _num(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise ParamError(f"temperature must be in [0, 2], got {temperature}", "temperature")
    echo = kind == "completion" and bool(body.get("echo"))
    structured = structured_of(body)
    if tool_schema is not None:
        if structured is not None:
            raise ParamError("a forced tool call and response_format / structured_outputs cannot be combined",
                             "tool_choice")
        structured = {"json": tool_schema}
    fields = dict(
        n=n, temperature=temperature, top_p=_num(body, "top_p", 1.0), top_k=_int(body, "top_k", -1),
        seed=_int(body, "seed", None), max_tokens=max_tokens, min_tokens=_int(body, "min_tokens", 0),
        stop=body.get("stop"), stop_token_ids=body.get("stop_token_ids"),
        ignore_eos=body.get("ignore_eos", False) or False,
        include_stop_str_in_output=body.get("include_stop_str_in_output", False) or False,
        skip_special_tokens=True if body.get("skip_special_tokens") is None else body["skip_special_tokens"],
        logprobs=logprobs, prompt_logprobs=(logprobs or 0) if echo and logprobs is not None else None,
        presence_penalty=_num(body, "presence_penalty", 0.0), frequency_penalty=_num(body, "frequency_penalty", 0.0),
        repetition_penalty=_num(body, "repetition_penalty", 1.0), logit_bias=body.get("logit_bias") or None,
        structured_outputs=structured)
    try:
        return SamplingParams(**fields)
    except ValueError as e:
        msg = str(e)
        param = next((k for k in fields if msg.startswith(k) or msg.startswith(f"structured_outputs")), None)
        if param == "structured_outputs" and body.get("response_format") is not None:
            param = "response_format"
        raise ParamError(msg, param) from None


def check_context(prompt_tokens: int, max_tokens: Optional[int], max_model_len: int) -> int:
    """The tokens a request may generate: ``max_tokens``, or what the context leaves when None;
    ParamError ``context_length_exceeded`` when the prompt and ``max_tokens`` do not fit."""
    room = max_model_len - prompt_tokens
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = prompt_tokens + (max_tokens or 1)
        raise ParamError(
            f"this model's maximum context length is {max_model_len} tokens; the request has {asked} "
            f"({prompt_tokens} in the prompt, {max_tokens or 1} to generate); lower max_tokens or shorten the prompt",
            "max_tokens" if room >= 1 else "prompt", "context_length_exceeded")
    return max_tokens if max_tokens is not None else room


def dumps_args(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def text_content(content) -> str:
    """A message's content as text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    from .errors import RequestError

    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise RequestError("only text content parts are supported")
            parts.append(p["text"])
        return "".join(parts)
    raise RequestError("message content must be a string or a list of text parts")
