"""One generation request on the event loop: its prompts go to the model's engine thread, its
messages come back through an asyncio queue, and leave as one body or as server-sent events."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from ..errors import CheckpointError, RequestError
from ..openai_bodies import (chunk, completion_body, completion_choice, echo_logprobs, logprobs_of,
                             new_id, prompt_logprob_entries, usage_chunk)
from . import tools as tools_mod
from .protocol import APIError

KEEPALIVE_S = 5.0  # an SSE comment this often while no token comes (a long prefill, experts paging in)


class _Sink:
    """What the engine thread puts messages on: hands them to the event loop's queue, tagged."""

    def __init__(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue, tag: int):
        self.loop, self.q, self.tag = loop, q, tag

    def put(self, msg) -> None:
        self.loop.call_soon_threadsafe(self.q.put_nowait, (self.tag, msg))


@dataclass
class Job:
    """A parsed request: its prompts (text or None, token ids), params and how to answer."""

    kind: str
    model: str
    prompts: list[tuple[Optional[str], list[int]]]
    params: object  # SamplingParams
    stream: bool
    include_usage: bool
    echo: bool = False
    echo_only: bool = False  # echo with max_tokens 0: the generated token is dropped
    tools: Optional[tools_mod.ToolPlan] = None
    token_ids: bool = False  # vLLM's return_token_ids: the prompt's and the generated token ids go out too


def generation_failed(e: Exception) -> APIError:
    """The 500 for a request whose generation failed; a damaged checkpoint says so in its code."""
    if isinstance(e, CheckpointError):
        return APIError(500, f"generation failed: the model's checkpoint is damaged: {e}", type="server_error",
                        code="checkpoint_error")
    return APIError(500, f"generation failed: {e}", type="server_error")


class Run:
    """The job's requests in the engine; ``abort`` drops whatever has not finished."""

    def __init__(self, job: Job, entry, metrics, t0: float):
        self.job, self.entry, self.metrics, self.t0 = job, entry, metrics, t0
        self.q: asyncio.Queue = asyncio.Queue()
        self.rids: list[str] = []
        self.first: Optional[float] = None
        self.last: Optional[float] = None

    async def start(self) -> None:
        """Submit every prompt and wait until the engine took each; a refused one is a 400."""
        loop = asyncio.get_running_loop()
        for i, (_, ids) in enumerate(self.job.prompts):
            rid, _ = self.entry.worker.submit(ids, self.job.params, out=_Sink(loop, self.q, i))
            self.rids.append(rid)
        pending, early = set(range(len(self.rids))), []
        while pending:
            tag, (kind, payload) = await self.q.get()
            if kind == "started":
                pending.discard(tag)
            elif kind == "error":
                if not isinstance(payload, RequestError):
                    raise APIError(500, f"the request could not start: {payload}", type="server_error")
                raise APIError(400, str(payload), param="messages" if self.job.kind == "chat" else "prompt",
                               code="context_length_exceeded" if "context" in str(payload) else None)
            else:  # a fast request may already stream before a later prompt's "started"
                early.append((tag, (kind, payload)))
        for m in early:
            self.q.put_nowait(m)

    def abort(self) -> None:
        for rid in self.rids:
            self.entry.worker.abort(rid)  # a no-op once finished; frees the slot when the client went away

    def _tick(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        elif self.last is not None:
            self.metrics.token_gap(self.job.model, now - self.last)
        self.last = now

    def _finished(self, done: dict) -> None:
        outs = [o for f in done.values() for o in f.outs]
        self.metrics.finished(self.job.model, sum(len(ids) for _, ids in self.job.prompts),
                              sum(len(o.token_ids) for o in outs),
                              None if self.first is None else self.first - self.t0, time.perf_counter() - self.t0,
                              [o.finish_reason for o in outs])

    async def _events(self, keepalive: Optional[float] = None) -> AsyncIterator[tuple]:
        """("delta", prompt index, payload) / ("done", prompt index, Finished) / ("keepalive",); ends
        when every prompt is done. A failed generation raises its APIError."""
        left = len(self.rids)
        while left:
            try:
                tag, (kind, payload) = await asyncio.wait_for(self.q.get(), keepalive)
            except asyncio.TimeoutError:
                yield ("keepalive",)
                continue
            if kind == "delta":
                self._tick()
                yield ("delta", tag, payload)
            elif kind == "prompt":
                yield ("prompt", tag, payload)
            elif kind == "done":
                left -= 1
                yield ("done", tag, payload)
            elif kind == "error":
                raise generation_failed(payload)

    # -- answers ----------------------------------------------------------------------------------

    def _index(self, tag: int, index: int) -> int:
        return tag * self.job.params.n + index

    async def body(self) -> dict:
        done: dict = {}
        async for ev in self._events():
            if ev[0] == "done":
                done[ev[1]] = ev[2]
        self._finished(done)
        job, tok = self.job, self.entry.llm.tokenizer
        choices, generated = [], 0
        for tag in range(len(job.prompts)):
            text, ids = job.prompts[tag]
            for out in done[tag].outs:
                if job.echo_only:
                    out = dataclasses.replace(out, text="", token_ids=[], finish_reason="length",
                                              logprobs=None if out.logprobs is None else [])
                generated += len(out.token_ids)
                i = self._index(tag, out.index)
                if job.kind == "chat":
                    choices.append(completion_choice("chat", i, out, tok, message=tools_mod.message(job.tools, out.text)))
                elif job.echo:
                    lp = None
                    if job.params.logprobs is not None:
                        lp = echo_logprobs(ids, done[tag].prompt_logprobs, job.params.logprobs, out.logprobs or [], tok)
                    choices.append(completion_choice("completion", i, out, tok, echo_text=_prompt_text(text, ids, tok),
                                                     echo_lp=lp))
                else:
                    choices.append(completion_choice("completion", i, out, tok))
        if job.token_ids:
            self._add_ids(choices, done)
        choices.sort(key=lambda c: c["index"])
        body = completion_body(job.kind, new_id(job.kind), job.model, [], sum(len(ids) for _, ids in job.prompts),
                               tok, choices=choices, completion_tokens=generated)
        if job.token_ids and job.kind == "chat":
            body["prompt_token_ids"] = job.prompts[0][1]
        return body

    def _add_ids(self, choices: list, done: dict) -> None:
        """vLLM's return_token_ids on a body: each choice's generated ids (and, completions, its prompt's)."""
        by_index = {}
        for tag in range(len(self.job.prompts)):
            for out in done[tag].outs:
                by_index[self._index(tag, out.index)] = (tag, [] if self.job.echo_only else list(out.token_ids))
        for c in choices:
            tag, ids = by_index[c["index"]]
            c["token_ids"] = ids
            if self.job.kind == "completion":
                c["prompt_token_ids"] = self.job.prompts[tag][1]

    async def sse(self) -> AsyncIterator[bytes]:
        """The stream: role chunks (chat), the echoed prompt (with its logprobs), deltas, tool calls
        as they are generated, the usage chunk, ``[DONE]``; a failure after the 200 is an error
        event, then ``[DONE]``."""
        job, tok = self.job, self.entry.llm.tokenizer
        rid = new_id(job.kind)

        def data(obj) -> bytes:
            return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()

        calls: dict[int, tools_mod.CallStream] = {}  # chat with tools: per choice
        offset: dict[int, int] = {}  # completions: text_offset of the choice's next token
        done: dict = {}
        first_ids: set = set()  # completions with return_token_ids: choices whose prompt ids went out
        echo_lp = job.echo and job.params.logprobs is not None  # the prompt goes out with its logprobs
        try:
            if job.kind == "chat":  # the role comes first, as OpenAI sends it
                for tag in range(len(job.prompts)):
                    for j in range(job.params.n):
                        c = chunk("chat", job.model, rid, self._index(tag, j), "", None, first=True)
                        if job.token_ids:  # as vLLM: the prompt's ids in the first chunk
                            c["prompt_token_ids"] = job.prompts[tag][1]
                        yield data(c)
            elif job.echo and not echo_lp:
                for tag in range(len(job.prompts)):
                    for j in range(job.params.n):
                        yield data(self._echo_chunk(rid, tag, j, None, offset))
            async for ev in self._events(KEEPALIVE_S):
                if ev[0] == "keepalive":
                    yield b": keep-alive\n\n"
                    continue
                if ev[0] == "done":
                    done[ev[1]] = ev[2]
                    continue
                if ev[0] == "prompt":
                    if echo_lp:
                        for j in range(job.params.n):
                            yield data(self._echo_chunk(rid, ev[1], j, ev[2], offset))
                    continue
                tag, (index, text, finish, lps, ids) = ev[1], ev[2]
                i = self._index(tag, index)
                if job.echo_only:  # the one token generated for the prompt's logprobs is not returned
                    if finish is not None:
                        yield data(chunk("completion", job.model, rid, i, "", "length"))
                    continue
                if job.tools is not None and job.tools.buffered:
                    cs = calls.setdefault(i, tools_mod.CallStream(job.tools))
                    for delta in cs.feed(text, final=finish is not None):
                        yield data(chunk("chat", job.model, rid, i, delta.get("content"), None,
                                         tool_calls=delta.get("tool_calls")))
                    if finish is not None:
                        yield data(chunk("chat", job.model, rid, i, None, "tool_calls" if cs.called else finish))
                    continue
                lp = None
                if lps:
                    lp = logprobs_of(job.kind, lps, tok, offset.get(i, 0))
                offset[i] = offset.get(i, 0) + len(text)
                c = chunk(job.kind, job.model, rid, i, text, finish, logprobs=lp)
                if job.token_ids:
                    if job.kind == "completion" and i not in first_ids:
                        first_ids.add(i)  # as vLLM: a choice's first chunk has its prompt's ids
                        c["choices"][0]["prompt_token_ids"] = job.prompts[tag][1]
                    c["choices"][0]["token_ids"] = ids
                yield data(c)
            self._finished(done)
            if job.include_usage:
                generated = 0 if job.echo_only else sum(len(o.token_ids) for f in done.values() for o in f.outs)
                yield data(usage_chunk(job.kind, job.model, rid, sum(len(ids) for _, ids in job.prompts), generated))
            yield data("[DONE]")
        except APIError as e:
            yield data(e.body())
            yield data("[DONE]")
        finally:
            self.abort()

    def _echo_chunk(self, rid: str, tag: int, j: int, prompt_logprobs, offset: dict) -> dict:
        """The streamed echo of prompt ``tag`` for its choice ``j`` (with the prompt's logprobs when
        ``prompt_logprobs`` is given)."""
        job, tok = self.job, self.entry.llm.tokenizer
        text, ids = job.prompts[tag]
        i = self._index(tag, j)
        shown = _prompt_text(text, ids, tok)
        lp = None if prompt_logprobs is None else echo_logprobs(ids, prompt_logprobs, job.params.logprobs, [], tok)
        offset[i] = len(shown) if lp is None else sum(len(t) for t in lp["tokens"])  # as the body counts them
        return chunk("completion", job.model, rid, i, shown, None, logprobs=lp)


def _prompt_text(text: Optional[str], ids: list[int], tokenizer) -> str:
    if text is not None:
        return text
    return tokenizer.decode(ids) if tokenizer is not None else ""


__all__ = ["Job", "Run", "generation_failed", "prompt_logprob_entries"]
