"""OpenAI response bodies (``text_completion``, ``chat.completion``, their stream chunks) from outputs.

Shared by the server and ``moetier batch``.
"""

from __future__ import annotations

import time
import uuid
from typing import Optional


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _tok(tokenizer, t: int) -> str:
    return tokenizer.decode([t]) if tokenizer is not None else str(t)


def logprobs_of(kind: str, entries: list[dict], tokenizer, start: int = 0) -> dict:
    """OpenAI's ``logprobs`` object for ``entries`` (``{"token", "logprob", "top"}`` per generated token);
    ``start``: the completion's ``text_offset`` of the first."""
    return _chat_logprobs(entries, tokenizer) if kind == "chat" else _completion_logprobs(entries, tokenizer, start)


def _chat_logprobs(entries: list[dict], tokenizer) -> dict:
    content = []
    for lp in entries:
        s = _tok(tokenizer, lp["token"])
        content.append({"token": s, "logprob": lp["logprob"], "bytes": list(s.encode()),
                        "top_logprobs": [{"token": _tok(tokenizer, t), "logprob": v,
                                          "bytes": list(_tok(tokenizer, t).encode())} for t, v in lp["top"]]})
    return {"content": content}


def _completion_logprobs(entries: list[dict], tokenizer, start: int = 0) -> dict:
    tokens = [_tok(tokenizer, lp["token"]) for lp in entries]
    offsets, pos = [], start
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": [lp["logprob"] for lp in entries],
            "top_logprobs": [{_tok(tokenizer, t): v for t, v in lp["top"]} for lp in entries],
            "text_offset": offsets}


def prompt_logprob_entries(prompt_ids: list[int], prompt_logprobs: Optional[list], k: int) -> list[dict]:
    """The prompt's tokens as logprob entries (``echo``): the first has none, the others their
    log-probability and the ``k`` most likely tokens at that position."""
    out = []
    for i, t in enumerate(prompt_ids):
        pos = prompt_logprobs[i] if prompt_logprobs is not None and i < len(prompt_logprobs) else None
        if pos is None:
            out.append({"token": t, "logprob": None, "top": None})
            continue
        top = sorted(((tid, lp) for tid, lp in pos.items() if lp.rank is not None and lp.rank <= k),
                     key=lambda x: x[1].rank)
        out.append({"token": t, "logprob": pos[t].logprob, "top": [(tid, lp.logprob) for tid, lp in top]})
    return out


def echo_logprobs(prompt_ids: list[int], prompt_logprobs: Optional[list], k: int, generated: list[dict],
                  tokenizer) -> dict:
    """Completion ``logprobs`` of the prompt then the generated tokens (``echo`` with ``logprobs``)."""
    entries = prompt_logprob_entries(prompt_ids, prompt_logprobs, k) + generated
    body = _completion_logprobs([dict(e, top=e["top"] or []) for e in entries], tokenizer)
    for i, e in enumerate(entries):  # the first prompt token has no logprob and no alternatives
        if e["top"] is None:
            body["top_logprobs"][i] = None
    return body


def completion_choice(kind: str, index: int, out, tokenizer, *, echo_text: str = "",
                      echo_lp: Optional[dict] = None, message: Optional[dict] = None) -> dict:
    """One choice of a non-streamed body. ``echo_text``: the prompt put before the text (``echo``),
    ``echo_lp``: its logprobs body; ``message``: a chat message made by the tools layer."""
    if echo_lp is not None:
        lp = echo_lp
    else:
        lp = logprobs_of(kind, out.logprobs, tokenizer) if out.logprobs is not None else None
    finish = out.finish_reason
    if kind == "chat":
        msg = message or {"role": "assistant", "content": out.text}
        if msg.get("tool_calls"):
            finish = "tool_calls"
        return {"index": index, "message": msg, "logprobs": lp, "finish_reason": finish}
    return {"index": index, "text": echo_text + out.text, "logprobs": lp, "finish_reason": finish}


def completion_body(kind: str, rid: str, model: str, outs: list, prompt_tokens: int, tokenizer,
                    choices: Optional[list[dict]] = None, completion_tokens: Optional[int] = None) -> dict:
    """An OpenAI ``chat.completion`` / ``text_completion`` body; ``outs``: CompletionOutputs in index order
    (or ready ``choices``, with ``completion_tokens``).

    ``rid`` is the id, or just its prefix (``"cmpl-"``) to get a fresh one.
    """
    if rid.endswith("-"):
        rid += uuid.uuid4().hex
    if choices is None:
        choices = [completion_choice(kind, c.index, c, tokenizer) for c in outs]
        completion_tokens = sum(len(c.token_ids) for c in outs)
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens or 0)}


def chunk(kind: str, model: str, rid: str, index: int, text: Optional[str], finish_reason: Optional[str],
          first: bool = False, logprobs: Optional[dict] = None, tool_calls: Optional[list] = None) -> dict:
    """One streamed chunk for choice ``index`` (``logprobs``: those of the tokens behind ``text``)."""
    if kind == "chat":
        delta: dict = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        if tool_calls is not None:
            delta["tool_calls"] = tool_calls
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(kind: str, model: str, rid: str, prompt_tokens: int, completion_tokens: int) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
