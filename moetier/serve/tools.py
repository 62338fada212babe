"""Chat ``tools`` and ``tool_choice``: the prompt that shows the tools, the constraint, the parsed calls.

- ``none``: the tools are left out of the prompt and the reply is text;
- ``auto`` (the default when tools are given): the tools go through the chat template and the
  reply is parsed for the template family's call syntax: Hermes / Qwen ``<tool_call>{json}</tool_call>``
  and Mistral ``[TOOL_CALLS][{json}, ...]``; text outside a call is the message's content;
- ``required``: the output is constrained to ``{"name": <one of the tools>, "arguments": <its
  parameters' schema>}``, so it always parses;
- a named function: the output is constrained to that function's parameter schema.

A reply with calls has ``tool_calls`` (arguments as JSON text) and ``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Optional

from ..errors import RequestError
from ..openai_api import ParamError

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_MISTRAL = "[TOOL_CALLS]"


@dataclass
class ToolPlan:
    mode: str  # "none", "auto", "required" or "named"
    tools: list[dict] = field(default_factory=list)  # OpenAI tool objects
    name: Optional[str] = None  # the named function
    schema: Optional[dict] = None  # what the output must match (required / named)

    @property
    def buffered(self) -> bool:
        """The reply's text cannot be streamed as content before it is known whether it is a call."""
        return self.mode in ("auto", "required", "named")


def _params(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def plan(body: dict) -> Optional[ToolPlan]:
    """The request's tool plan; None without tools. ParamError for a bad combination."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise ParamError("tool_choice needs tools", "tool_choice")
        return None
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise ParamError("tools: function names must be unique", "tools")
    if choice is None or choice == "auto":
        return ToolPlan("auto", tools)
    if choice == "none":
        return ToolPlan("none", tools)
    if choice == "required":
        any_of = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]}, "arguments": _params(t)},
                   "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        return ToolPlan("required", tools, schema=any_of[0] if len(any_of) == 1 else {"anyOf": any_of})
    name = choice["function"]["name"] if isinstance(choice, dict) else None
    if name not in names:
        raise ParamError(f"tool_choice names the function {name!r}, which is not in tools ({', '.join(names)})",
                         "tool_choice")
    return ToolPlan("named", tools, name=name, schema=_params(tools[names.index(name)]))


def chat_ids(tokenizer, messages: list[dict], tools: Optional[ToolPlan]) -> list[int]:
    """The conversation's token ids through the chat template, with the tools shown unless ``none``."""
    if tokenizer is None:
        raise RequestError("chat needs a tokenizer, and this model folder has none; use /v1/completions with "
                           "token ids")
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model's tokenizer has no chat template; use /v1/completions")
    kw = {"tools": tools.tools} if tools is not None and tools.mode != "none" else {}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)
    return tokenizer.encode(text, add_special_tokens=False)


def _call(name: str, arguments) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}


def message(tp: Optional[ToolPlan], text: str) -> dict:
    """The assistant message for a finished reply ``text``."""
    if tp is None or tp.mode == "none":
        return {"role": "assistant", "content": text}
    if tp.mode == "named":
        return {"role": "assistant", "content": None, "tool_calls": [_call(tp.name, text)]}
    if tp.mode == "required":
        try:
            obj = json.loads(text)
            return {"role": "assistant", "content": None, "tool_calls": [_call(obj["name"], obj["arguments"])]}
        except (ValueError, KeyError, TypeError):  # cut short by max_tokens: the text as it is
            return {"role": "assistant", "content": text}
    calls, content = parse_calls(text, {t["function"]["name"] for t in tp.tools})
    msg: dict = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = calls
    return msg


def parse_calls(text: str, names: set[str]) -> tuple[list[dict], Optional[str]]:
    """Tool calls in ``text`` (Hermes or Mistral syntax) naming known tools, and the text left."""
    calls: list[dict] = []
    objs: list = []
    rest = text
    if "<tool_call>" in text:
        for m in _HERMES.finditer(text):
            try:
                objs.append(json.loads(m.group(1)))
            except ValueError:
                continue
        rest = text[:text.index("<tool_call>")]
    elif _MISTRAL in text:
        head, _, tail = text.partition(_MISTRAL)
        try:
            got = json.loads(tail.strip())
            objs = got if isinstance(got, list) else [got]
            rest = head
        except ValueError:
            pass
    for o in objs:
        if isinstance(o, dict) and o.get("name") in names:
            calls.append(_call(o["name"], o.get("arguments", o.get("parameters", {}))))
    content = rest.strip() if calls else text
    return calls, (content or None) if calls else content


def stream_calls(msg: dict) -> list[dict]:
    """The ``tool_calls`` delta of a streamed reply (one chunk per call, as OpenAI's carry them)."""
    return [dict(c, index=i) for i, c in enumerate(msg.get("tool_calls") or [])]
