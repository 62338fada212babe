"""Chat ``tools`` and ``tool_choice``: the prompt that shows the tools, the constraint, the parsed calls.

- ``none``: the tools are left out of the prompt and the reply is text;
- ``auto`` (the default when tools are given): the tools go through the chat template and the
  reply is parsed for the template family's call syntax: Hermes / Qwen ``<tool_call>{json}</tool_call>``
  (one block per call) and Mistral ``[TOOL_CALLS][{json}, ...]``; text before the first call is the
  message's content;
- ``required``: the output is constrained to a JSON list of ``{"name": <one of the tools>,
  "arguments": <its parameters' schema>}`` (one item when ``parallel_tool_calls`` is false), so
  it always parses;
- a named function: the output is constrained to that function's parameter schema.

A reply with calls has ``tool_calls`` (arguments as the JSON text generated) and ``finish_reason:
"tool_calls"``. Streamed, :class:`CallStream` sends each call as OpenAI does: a first delta with the
call's ``index``, ``id``, ``type`` and ``name``, then its ``arguments`` piece by piece as they are
generated. ``parallel_tool_calls: false`` keeps the first call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Optional

from ..errors import RequestError
from ..openai_api import ParamError

_HERMES, _HERMES_END = "<tool_call>", "</tool_call>"
_MISTRAL = "[TOOL_CALLS]"
_WS = " \t\r\n"


@dataclass
class ToolPlan:
    mode: str  # "none", "auto", "required" or "named"
    tools: list[dict] = field(default_factory=list)  # OpenAI tool objects
    name: Optional[str] = None  # the named function
    schema: Optional[dict] = None  # what the output must match (required / named)
    parallel: bool = True  # parallel_tool_calls: more than one call per reply

    @property
    def buffered(self) -> bool:
        """The reply's text is not streamed as it comes: it may be (or is) a call."""
        return self.mode in ("auto", "required", "named")

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}


def _params(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def plan(body: dict) -> Optional[ToolPlan]:
    """The request's tool plan; None without tools. ParamError for a bad combination."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls") is not False  # OpenAI's default: true
    if not tools:
        if choice not in (None, "none"):
            raise ParamError("tool_choice needs tools", "tool_choice")
        return None
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise ParamError("tools: function names must be unique", "tools")
    if choice is None or choice == "auto":
        return ToolPlan("auto", tools, parallel=parallel)
    if choice == "none":
        return ToolPlan("none", tools, parallel=parallel)
    if choice == "required":
        any_of = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]}, "arguments": _params(t)},
                   "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        schema = {"type": "array", "minItems": 1, "items": any_of[0] if len(any_of) == 1 else {"anyOf": any_of}}
        if not parallel:
            schema["maxItems"] = 1
        return ToolPlan("required", tools, schema=schema, parallel=parallel)
    name = choice["function"]["name"] if isinstance(choice, dict) else None
    if name not in names:
        raise ParamError(f"tool_choice names the function {name!r}, which is not in tools ({', '.join(names)})",
                         "tool_choice")
    return ToolPlan("named", tools, name=name, schema=_params(tools[names.index(name)]), parallel=parallel)


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


# -- reading calls out of a (growing) reply ---------------------------------------------------------


@dataclass
class Call:
    name: Optional[str]  # None until its JSON string is complete
    arguments: str  # the arguments' JSON text so far ("" while it cannot be streamed yet)
    complete: bool


def _skip(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _value_end(s: str, i: int) -> Optional[int]:
    """The end of the JSON value that starts at ``s[i]``, or None when ``s`` ends first."""
    depth, in_str, esc = 0, False, False
    for j in range(i, len(s)):
        c = s[j]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
                if depth == 0:
                    return j + 1
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth <= 0:
                return j + 1 if depth == 0 else j  # below 0: a scalar ended by its container
        elif c == "," and depth == 0:
            return j
    return None


def _object(s: str, i: int) -> tuple[Optional[Call], Optional[int]]:
    """The call object ``{"name": ..., "arguments": ...}`` at ``s[i]``: the call so far and the
    index after it (None while incomplete); (None, None) when ``s[i:]`` is not such an object."""
    i = _skip(s, i)
    if i >= len(s):
        return Call(None, "", False), None
    if s[i] != "{":
        return None, None
    name, args, args_done = None, "", False
    i += 1
    while True:
        i = _skip(s, i)
        if i >= len(s):
            return Call(name, args, False), None
        if s[i] == "}":
            return Call(name, args, args_done), i + 1
        if s[i] == ",":
            i += 1
            continue
        if s[i] != '"':
            return None, None
        kend = _value_end(s, i)
        if kend is None:
            return Call(name, args, False), None
        key = json.loads(s[i:kend])
        i = _skip(s, kend)
        if i >= len(s):
            return Call(name, args, False), None
        if s[i] != ":":
            return None, None
        vstart = _skip(s, i + 1)
        vend = _value_end(s, vstart)
        raw = (s[vstart:] if vend is None else s[vstart:vend]).rstrip()
        if key == "name" and vend is not None:
            try:
                name = json.loads(raw)
            except ValueError:
                return None, None
            name = name if isinstance(name, str) else None
        elif key in ("arguments", "parameters"):
            if vend is not None:
                try:
                    v = json.loads(raw)
                except ValueError:
                    return None, None
                args, args_done = (v if isinstance(v, str) else raw), True
            elif raw.startswith("{"):
                args = raw  # an object can be streamed as it grows; a JSON string only once whole
        if vend is None:
            return Call(name, args, False), None
        i = vend


def _list(s: str, i: int) -> list[Call]:
    """The calls of the JSON list ``[{...}, ...]`` at ``s[i]``, the last possibly incomplete."""
    i = _skip(s, i)
    if i >= len(s) or s[i] != "[":
        return []
    calls, i = [], i + 1
    while True:
        i = _skip(s, i)
        if i >= len(s) or s[i] == "]":
            return calls
        if s[i] == ",":
            i += 1
            continue
        call, end = _object(s, i)
        if call is None:
            return calls
        calls.append(call)
        if end is None:
            return calls
        i = end


def _held(text: str) -> int:
    """How many characters at the end of ``text`` could be the start of a call tag."""
    for n in range(min(len(text), len(_HERMES)), 0, -1):
        if _HERMES.startswith(text[-n:]) or _MISTRAL.startswith(text[-n:]):
            return n
    return 0


def scan(tp: ToolPlan, text: str, final: bool) -> tuple[Optional[str], list[Call]]:
    """The reply's content and calls. Not ``final``: what can be sent so far (trailing whitespace
    and what may be a call tag held back). ``final``: the message's content (None when it has
    calls and nothing else) and its calls, only those that name a tool and whose arguments parse."""
    if tp.mode == "named":
        calls = [Call(tp.name, text.strip() if final else text.rstrip(), final)]
        return None, calls
    if tp.mode == "required":
        calls, content_at = _list(text, 0), 0
    else:
        h, m = text.find(_HERMES), text.find(_MISTRAL)
        if h < 0 and m < 0:
            if final:
                return text, []
            return text[:len(text) - _held(text)].rstrip(), []
        if h >= 0 and (m < 0 or h < m):
            content_at, calls = h, []
            while h >= 0:
                call, _ = _object(text, h + len(_HERMES))
                if call is not None:
                    calls.append(call)
                end = text.find(_HERMES_END, h)
                h = -1 if end < 0 else text.find(_HERMES, end)
        else:
            content_at, calls = m, _list(text, m + len(_MISTRAL))
    if not tp.parallel:
        calls = calls[:1]
    if not final:
        return text[:content_at].rstrip(), calls
    calls = [c for c in calls if c.complete and c.name in tp.names and _parses(c.arguments)]
    if not calls:
        return text, []
    return text[:content_at].strip() or None, calls


def _parses(arguments: str) -> bool:
    try:
        return isinstance(json.loads(arguments), dict)
    except ValueError:
        return False


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def message(tp: Optional[ToolPlan], text: str) -> dict:
    """The assistant message for a finished reply ``text``."""
    if tp is None or tp.mode == "none":
        return {"role": "assistant", "content": text}
    content, calls = scan(tp, text, final=True)
    msg: dict = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = [{"id": _call_id(), "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
    return msg


class CallStream:
    """A streamed reply's deltas (``{"content": ...}`` / ``{"tool_calls": [...]}``) as its text grows."""

    def __init__(self, tp: ToolPlan):
        self.tp = tp
        self.text = ""
        self.content = ""  # content sent
        self.sent: list[list] = []  # per call: [id, arguments text sent]
        self.called = False  # once final: the reply has calls (its finish_reason is "tool_calls")

    def feed(self, delta: str, final: bool = False) -> list[dict]:
        """The deltas that ``delta`` (the reply's next text) completes; ``final``: the reply's end."""
        self.text += delta
        content, calls = scan(self.tp, self.text, final)
        if final:
            self.called = bool(calls)
        out: list[dict] = []
        if content and content.startswith(self.content) and len(content) > len(self.content):
            out.append({"content": content[len(self.content):]})
            self.content = content
        for i, c in enumerate(calls):
            if i == len(self.sent):
                if c.name not in self.tp.names:
                    break  # the header waits for a tool's name (it may come after the arguments)
                self.sent.append([_call_id(), ""])
                out.append({"tool_calls": [{"index": i, "id": self.sent[i][0], "type": "function",
                                            "function": {"name": c.name, "arguments": ""}}]})
            done = self.sent[i][1]
            if len(c.arguments) > len(done) and c.arguments.startswith(done):
                out.append({"tool_calls": [{"index": i, "function": {"arguments": c.arguments[len(done):]}}]})
                self.sent[i][1] = c.arguments
        return out
