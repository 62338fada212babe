"""A cascade served by ``moetier serve --cascade NAME=A,B`` (or ``NAME=calibration.json``).

Requests to the model id ``NAME`` go to the pool's model ``A`` first; when its confidence in
the answer (:mod:`moetier.cascade`'s rule over its token probabilities) passes the threshold
the answer is the reply, otherwise the request runs again on ``B``, and so on. The cascade's
models are ordinary pool entries (also served under their own ids), loaded on first use and
sharing their engine threads with direct requests. Each response's ``model`` names the model
that answered; ``moetier_cascade`` adds the cascade's name, each model's confidence and the
thresholds. A streamed request gets its answer once the cascade has decided (the small
model's tokens are not final until then). Tools and ``echo`` are not served by a cascade.
"""

from __future__ import annotations

import asyncio
import json
from typing import Optional

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from .cascade import _strip, passes, request_confidence, scoring_params
from .errors import RequestError
from .openai_api import ParamError, check_context, prompts_of, sampling_params, text_content
from .openai_bodies import chunk, completion_body, completion_choice, new_id, usage_chunk
from .outputs import RequestOutput
from .serve.protocol import APIError


class _Sink:
    def __init__(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue, tag: int):
        self.loop, self.q, self.tag = loop, q, tag

    def put(self, msg) -> None:
        self.loop.call_soon_threadsafe(self.q.put_nowait, (self.tag, msg))


def _prompts(tok, kind: str, body: dict) -> list[tuple[Optional[str], list[int]]]:
    from .tokenizer import chat_prompt, require

    if kind == "chat":
        msgs = [dict(m, content=text_content(m.get("content") or "")) for m in body["messages"]]
        return [(None, chat_prompt(tok, msgs))]
    return [(p, require(tok, "a text prompt").encode(p)) if isinstance(p, str) else (None, list(p))
            for p in prompts_of(body)]


async def _run_level(entry, prompts, params) -> list[RequestOutput]:
    """Every prompt through one model's engine thread; their outputs once all are done."""
    loop, q = asyncio.get_running_loop(), asyncio.Queue()
    rids = [entry.worker.submit(ids, params, out=_Sink(loop, q, i))[0] for i, (_, ids) in enumerate(prompts)]
    done: dict[int, RequestOutput] = {}
    try:
        while len(done) < len(prompts):
            tag, (kind, payload) = await q.get()
            if kind == "done":
                text, ids = prompts[tag]
                done[tag] = RequestOutput(str(tag), text, ids, payload.outs)
            elif kind == "error":
                if isinstance(payload, RequestError):
                    raise APIError(400, str(payload), param="prompt",
                                   code="context_length_exceeded" if "context" in str(payload) else None)
                raise APIError(500, f"generation failed: {payload}", type="server_error")
    finally:
        for rid in rids:
            entry.worker.abort(rid)  # a no-op for finished ones; a failed request frees its slots
    return [done[i] for i in range(len(prompts))]


async def generate(st, kind: str, req, body: dict, spec: dict):
    """Answer one completion / chat request with the cascade ``spec`` (``name``, ``models``, ``rule``,
    ``thresholds``); ``st``: the app's state (pool, admission, metrics)."""
    name, models = spec["name"], spec["models"]
    status = 500
    st.admit()
    try:
        if (kind == "chat" and body.get("tools")) or (kind == "completion" and body.get("echo")):
            raise APIError(400, f"the cascade {name!r} serves plain completions and chats (no tools, no echo)",
                           param="tools" if kind == "chat" else "echo")
        params = sampling_params(body, kind, None)
        confidences: list[Optional[float]] = []
        for level, model in enumerate(models):
            last = level == len(models) - 1
            cm = st.pool.use(model)
            entry = await run_in_threadpool(cm.__enter__)
            try:
                llm = entry.llm
                prompts = _prompts(llm.tokenizer, kind, body)
                for _, ids in prompts:
                    llm.engine.check_prompt(ids)
                    check_context(len(ids), params.max_tokens, llm.engine.max_model_len)
                run = params if last else scoring_params(params, spec["rule"], spec["thresholds"][level])
                outs = await _run_level(entry, prompts, run)
                tok = llm.tokenizer
            finally:
                cm.__exit__(None, None, None)
            conf = None if last else min(request_confidence(o, spec["rule"]) for o in outs)
            confidences.append(conf)
            if last or passes(conf, spec["thresholds"][level]):
                break
        if not last:  # the logprobs the rule needed, not those the client asked for
            for o in outs:
                _strip(o, params.logprobs)
        status = 200
        info = {"name": name, "confidences": confidences, "thresholds": spec["thresholds"], "rule": spec["rule"]}
        result = _body(kind, model, outs, prompts, tok)
        result["moetier_cascade"] = info
        if req.stream:
            opts = body.get("stream_options") or {}
            return StreamingResponse(_sse(kind, model, result, bool(opts.get("include_usage"))),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(result)
    except ParamError as e:
        status = 400
        raise APIError(400, str(e), param=e.param, code=e.code) from None
    except RequestError as e:
        status = 400
        raise APIError(400, str(e), param="messages" if kind == "chat" else "prompt",
                       code="context_length_exceeded" if "context" in str(e) else None) from None
    except APIError as e:
        status = e.status
        raise
    finally:
        st.leave()
        st.metrics.request_done(name, status)


def _body(kind: str, model: str, outs: list[RequestOutput], prompts, tok) -> dict:
    n = len(outs[0].outputs)
    choices = [completion_choice(kind, tag * n + c.index, c, tok) for tag, o in enumerate(outs) for c in o.outputs]
    return completion_body(kind, new_id(kind), model, [], sum(len(ids) for _, ids in prompts), tok, choices=choices,
                           completion_tokens=sum(len(c.token_ids) for o in outs for c in o.outputs))


async def _sse(kind: str, model: str, result: dict, include_usage: bool):
    def data(obj) -> bytes:
        return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    rid = result["id"]
    for c in result["choices"]:
        text = c["message"]["content"] if kind == "chat" else c["text"]
        if kind == "chat":
            yield data(chunk(kind, model, rid, c["index"], "", None, first=True))
        part = chunk(kind, model, rid, c["index"], text, None, logprobs=c["logprobs"])
        part["moetier_cascade"] = result["moetier_cascade"]
        yield data(part)
        yield data(chunk(kind, model, rid, c["index"], None if kind == "chat" else "", c["finish_reason"]))
    if include_usage:
        u = result["usage"]
        yield data(usage_chunk(kind, model, rid, u["prompt_tokens"], u["completion_tokens"]))
    yield data("[DONE]")
