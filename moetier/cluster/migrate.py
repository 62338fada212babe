"""A client's stream that outlives its replica: live migration on drain, resumption on a crash.

The router forwards a stream asking the replica for token ids too (vLLM's ``return_token_ids``)
and keeps, while it forwards the chunks, the prompt's token ids and the ids generated so far.
When the replica is drained (it left Serve's running set, :mod:`moetier.cluster.replica_sets`, and
another replica is in it) or dies mid-stream while another replica exists, the router cancels
what is left of the first request and sends the model's deployment a continuation: a
``/v1/completions`` stream whose prompt is those token ids (prompt + generated, re-prefilled
there, nothing re-tokenized) with ``max_tokens`` / ``min_tokens`` less what was generated. Its
chunks reach the client as the rest of the same stream: same id, chat chunks made from the
completion's, ``usage`` counting the original prompt and every generated token. A greedy request
gives the tokens of an uninterrupted one. With no other replica the client gets an OpenAI-shaped
``replica_lost`` error event and ``[DONE]``: never a hung stream.

Streams it does not carry over (they get the error on a loss): ``n`` > 1, several prompts,
``echo``, ``logprobs``, tools and structured outputs (their state is more than the tokens).
Sampling with ``temperature`` > 0 continues with a fresh random state, and penalties over the
output count the carried-over tokens as prompt.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Optional

log = logging.getLogger(__name__)

MAX_MOVES = 3  # continuations one stream may need
DROP = ("messages", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls", "response_format",
        "structured_outputs", "logprobs", "top_logprobs", "echo", "suffix", "n", "best_of")


def carried(kind: str, body: dict) -> bool:
    """Whether a stream with this body can move to another replica."""
    if body.get("stream") is not True or body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1):
        return False
    if body.get("logprobs") or body.get("top_logprobs") or body.get("structured_outputs"):
        return False
    if body.get("response_format") not in (None, {"type": "text"}):
        return False
    if kind == "chat":
        return not body.get("tools") and isinstance(body.get("messages"), list)
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    ints = isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
    return not body.get("echo") and ((isinstance(p, str) and bool(p)) or bool(ints))


def continuation(body: dict, prompt_ids: list[int], ids: list[int], max_tokens: int) -> dict:
    """The ``/v1/completions`` body that goes on from ``prompt_ids`` + ``ids``."""
    out = {k: v for k, v in body.items() if k not in DROP}
    out.update(prompt=list(prompt_ids) + list(ids), max_tokens=max_tokens - len(ids), stream=True,
               return_token_ids=True, min_tokens=max(0, (body.get("min_tokens") or 0) - len(ids)))
    return out


def asked_max_tokens(kind: str, body: dict) -> Optional[int]:
    if kind == "chat":
        v = body.get("max_completion_tokens")
        return v if v is not None else body.get("max_tokens")
    return body.get("max_tokens", 16)


def data(obj) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def lost_event(name: str, why: str = "") -> bytes:
    err = {"error": {"message": f"the replica serving {name!r} was lost mid-stream{why}", "type": "server_error",
                     "param": None, "code": "replica_lost"}}
    return data(err) + data("[DONE]")


class Tokens:
    """What the client has been sent of one stream, read from the SSE events as they pass."""

    def __init__(self, kind: str, want_ids: bool):
        self.kind, self.want_ids = kind, want_ids
        self.prompt_ids: Optional[list[int]] = None
        self.ids: list[int] = []
        self.rid: Optional[str] = None
        self.created: Optional[int] = None
        self.finished = False  # a finish_reason went out
        self.done = False  # [DONE] went out
        self.failed = False  # the app sent an error event
        self.resumed = False  # events now come from a continuation (a completions stream)
        self._buf = b""

    def feed(self, item: bytes) -> list[bytes]:
        """The client's bytes for a chunk of the replica's stream (whole events only)."""
        self._buf += item
        out = []
        while b"\n\n" in self._buf:
            ev, self._buf = self._buf.split(b"\n\n", 1)
            out.append(self._event(ev))
        return [o for o in out if o]

    def _event(self, ev: bytes) -> bytes:
        if not ev.startswith(b"data: "):
            return ev + b"\n\n"  # a keep-alive comment
        payload = ev[6:]
        if payload.strip() == b"[DONE]":
            self.done = True
            return data("[DONE]")
        obj = json.loads(payload)
        if "error" in obj:
            self.failed = True
            return data(obj)
        if self.rid is None:
            self.rid, self.created = obj.get("id"), obj.get("created")
        top = obj.pop("prompt_token_ids", None)
        new = []
        for c in obj.get("choices") or []:
            p = c.pop("prompt_token_ids", None)
            if self.prompt_ids is None and (p is not None or top is not None):
                self.prompt_ids = list(p if p is not None else top)
                if self.want_ids and p is not None:
                    c["prompt_token_ids"] = p
            ids = c.pop("token_ids", None) or []
            new += ids
            if c.get("finish_reason"):
                self.finished = True
            if self.want_ids:
                c["token_ids"] = ids
        if self.want_ids and top is not None and not self.resumed:
            obj["prompt_token_ids"] = top
        self.ids += new
        if self.resumed:
            obj = self._as_first(obj)
        return data(obj)

    def _as_first(self, obj: dict) -> dict:
        """A continuation's chunk as a chunk of the first stream: its id, its object, its usage."""
        obj["id"], obj["created"] = self.rid, self.created
        if obj.get("usage"):
            p = len(self.prompt_ids or [])
            obj["usage"] = {"prompt_tokens": p, "completion_tokens": len(self.ids), "total_tokens": p + len(self.ids)}
        if self.kind != "chat":
            return obj
        obj["object"] = "chat.completion.chunk"
        choices = []
        for c in obj.get("choices") or []:
            delta = {"content": c["text"]} if c.get("text") else {}
            ch = {"index": c.get("index", 0), "delta": delta, "finish_reason": c.get("finish_reason"),
                  "logprobs": None}
            if self.want_ids:
                ch["token_ids"] = c.get("token_ids", [])
            choices.append(ch)
        obj["choices"] = choices
        return obj


async def next_or_change(it, pending, watch) -> tuple[str, object]:
    """("item", x) / ("end", None) / ("error", e) from ``pending`` (the iterator's next), or
    ("change", None) when the replica sets change first; ``pending`` goes on running then."""
    wait = asyncio.ensure_future(watch.event.wait())
    try:
        done, _ = await asyncio.wait({pending, wait}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        wait.cancel()
    if pending not in done:
        return "change", None
    try:
        return "item", pending.result()
    except StopAsyncIteration:
        return "end", None
    except Exception as e:  # noqa: BLE001 - the replica died, its actor is gone
        return "error", e
