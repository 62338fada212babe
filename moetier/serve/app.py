"""The HTTP endpoints, on FastAPI: :func:`create_app` is an ASGI app that any ASGI host can mount
(uvicorn through ``moetier serve``, Ray Serve, a bigger FastAPI app); the model pool's engine
threads do the work, the event loop only parses, queues and streams."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from contextlib import asynccontextmanager
from typing import Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import RequestError
from ..openai_api import ParamError, check_context, echo_only, prompts_of, sampling_params, text_content
from . import tools as tools_mod
from .generation import Job, Run
from .metrics import Metrics
from .pool import ModelPool
from .protocol import (APIError, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                       CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse, ModelCard,
                       ModelList, TokenizeRequest, TokenizeResponse)

log = logging.getLogger(__name__)

MAX_BODY = 32 * 2**20
DEFAULT_MAX_REQUESTS = 256
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
_TYPE_TAGS = {"int", "float", "str", "bool", "list", "dict", "none", "literal"}  # pydantic's union branch names
ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
          429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


class State:
    """What the endpoints share: the pool, the API key, the request cap, the metrics."""

    def __init__(self, pool: ModelPool, api_key: Optional[str], max_requests: int, keep_alive: Optional[float]):
        self.pool, self.api_key, self.max_requests, self.keep_alive = pool, api_key, max_requests, keep_alive
        self.metrics = Metrics()
        self.inflight = 0
        self.created = int(time.time())

    def admit(self) -> None:
        if self.inflight >= self.max_requests:
            raise APIError(429, f"the server is serving its limit of {self.max_requests} requests; retry "
                                "shortly", type="requests", code="rate_limit_exceeded")
        self.inflight += 1  # the event loop is one thread: no lock needed

    def leave(self) -> None:
        self.inflight -= 1

    def model(self, name) -> str:
        if name not in self.pool.entries:
            raise APIError(404, f"the model {name!r} does not exist; this server has {', '.join(self.pool.names())}",
                           param="model", code="model_not_found")
        return name


class BodyLimit:
    """A 413 for a body over ``MAX_BODY`` by its Content-Length, before anything reads it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            n = dict(scope["headers"]).get(b"content-length", b"0")
            if not n.isdigit() or int(n) > MAX_BODY:
                e = APIError(413, f"the request body is {n.decode(errors='replace')} bytes; the limit is {MAX_BODY}") \
                    if n.isdigit() else APIError(400, "bad Content-Length header")
                return await JSONResponse(e.body(), e.status)(scope, receive, send)
        await self.app(scope, receive, send)


def parse_keep_alive(v) -> Optional[float]:
    """Ollama's ``keep_alive``: seconds, or ``"30s"``, ``"5m"``, ``"1h"``; negative: forever."""
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", v)
    if not m:
        raise APIError(400, f"keep_alive must be seconds or a duration such as '5m', got {v!r}", param="keep_alive")
    return float(m.group(1)) * {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def create_app(pool: ModelPool, api_key: Optional[str] = None, max_requests: int = DEFAULT_MAX_REQUESTS,
               keep_alive: Optional[float] = None) -> FastAPI:
    """The OpenAI-compatible app over ``pool``; closing the app's lifespan closes the pool."""
    st = State(pool, api_key, max_requests, keep_alive)

    @asynccontextmanager
    async def lifespan(app):
        reaper = asyncio.create_task(_reap(pool))
        try:
            yield
        finally:
            reaper.cancel()
            await run_in_threadpool(pool.close)

    # strict_content_type=False: a JSON body without a Content-Type header is read as JSON, as OpenAI's is
    app = FastAPI(title="moetier", version="1", lifespan=lifespan, strict_content_type=False,
                  description="OpenAI-compatible API over moetier's engine (completions, chat, tools, "
                              "structured outputs), with vLLM's extras (/tokenize, /detokenize, sampling fields).")
    app.state.moetier = st
    app.add_middleware(BodyLimit)

    async def auth(request: Request) -> None:
        if st.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), st.api_key.encode())):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), e.status, headers={"Retry-After": "1"} if e.status in (429, 503) else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # a union's branch names (str, list[...]) follow the field: keep the field and list indices
        path = []
        for x in loc:
            if path and not x.isdigit() and (x in _TYPE_TAGS or "[" in x or "-" in x or x[:1].isupper()):
                break
            path.append(f"[{x}]" if x.isdigit() else (f".{x}" if path else x))
        param = "".join(path) or None
        if err.get("type") == "json_invalid":
            api = APIError(400, f"the request body is not valid JSON ({err.get('msg')})", code="invalid_json")
        elif err.get("type") == "missing":
            api = APIError(400, f"{param} is required", param=param, code="missing_required_parameter")
        else:
            api = APIError(400, f"{param or 'the request body'}: {err.get('msg')}"
                                + (f" (got {err['input']!r:.80})" if param and "input" in err else ""),
                           param=param, code="invalid_type" if err.get("type", "").endswith("_type") else None)
        if request.url.path in GENERATION_PATHS:
            body = e.body if isinstance(e.body, dict) else {}
            st.metrics.request_done(body.get("model") if body.get("model") in pool.entries else "unknown", 400)
        return JSONResponse(api.body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        code = "not_found" if e.status_code == 404 else None
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(APIError(e.status_code, msg, code=code).body(), e.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):  # a bug answers 500; the server keeps running
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(APIError(500, f"internal error: {e}", type="server_error").body(), 500)

    @app.get("/health", tags=["server"])
    async def health():
        loaded = pool.loaded()
        return {"status": "ok", "requests_inflight": st.inflight, "requests_live": sum(m.worker.live() for m in loaded),
                "models_loaded": [m.name for m in loaded], "aborted": sum(m.worker.aborted for m in loaded)}

    @app.get("/metrics", tags=["server"], response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(st.metrics.render(pool, st.inflight), media_type="text/plain; version=0.0.4; charset=utf-8")

    def card(e) -> dict:
        llm = e.llm
        return {"id": e.name, "object": "model", "created": st.created, "owned_by": "moetier", "loaded": e.loaded,
                "max_model_len": llm.engine.max_model_len if llm is not None else None}

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(auth)], tags=["models"], responses=ERRORS)
    async def models():
        cascades = [{"id": n, "object": "model", "created": st.created, "owned_by": "moetier",  # --cascade
                     "loaded": all(pool.entries[m].loaded for m in c["models"])}
                    for n, c in getattr(pool, "cascades", {}).items()]
        return {"object": "list", "data": [card(e) for e in pool.entries.values()] + cascades}

    @app.post("/v1/models/{model_id:path}/load", response_model=ModelCard, dependencies=[Depends(auth)],
              tags=["models"], responses=ERRORS)
    async def load(model_id: str):
        await run_in_threadpool(pool.load, st.model(model_id))
        return card(pool.entries[model_id])

    @app.post("/v1/models/{model_id:path}/unload", response_model=ModelCard, dependencies=[Depends(auth)],
              tags=["models"], responses=ERRORS)
    async def unload(model_id: str):
        if not await run_in_threadpool(pool.unload, st.model(model_id)):
            raise APIError(409, f"the model {model_id!r} is serving requests; unload it once they finish",
                           code="model_busy")
        return card(pool.entries[model_id])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, dependencies=[Depends(auth)],
             tags=["models"], responses=ERRORS)
    async def model(model_id: str):
        return card(pool.entries[st.model(model_id)])

    @app.post("/v1/completions", response_model=CompletionResponse, dependencies=[Depends(auth)],
              tags=["generation"], responses=ERRORS)
    async def completions(req: CompletionRequest):
        return await _generate(st, "completion", req)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, dependencies=[Depends(auth)],
              tags=["generation"], responses=ERRORS)
    async def chat(req: ChatCompletionRequest):
        return await _generate(st, "chat", req)

    @app.post("/tokenize", response_model=TokenizeResponse, dependencies=[Depends(auth)], tags=["tokenizer"],
              responses=ERRORS)
    async def tokenize(req: TokenizeRequest):
        with _Using(st, req.model) as entry:
            await entry.ready()
            tok, llm = entry.entry.llm.tokenizer, entry.entry.llm
            try:
                if (req.prompt is None) == (req.messages is None):
                    raise APIError(400, "give prompt or messages", param="prompt")
                if req.messages is not None:
                    msgs = [_message(m.model_dump(exclude_none=True)) for m in req.messages]
                    ids = tools_mod.chat_ids(tok, msgs, None) if req.add_generation_prompt else \
                        _require(tok).encode(_require(tok).apply_chat_template(msgs, tokenize=False),
                                             add_special_tokens=False)
                else:
                    ids = _require(tok).encode(req.prompt, add_special_tokens=bool(req.add_special_tokens))
            except RequestError as e:
                raise APIError(400, str(e), param="prompt") from None
            return {"count": len(ids), "max_model_len": llm.engine.max_model_len, "tokens": ids}

    @app.post("/detokenize", response_model=DetokenizeResponse, dependencies=[Depends(auth)], tags=["tokenizer"],
              responses=ERRORS)
    async def detokenize(req: DetokenizeRequest):
        with _Using(st, req.model) as entry:
            await entry.ready()
            llm = entry.entry.llm
            bad = [t for t in req.tokens if not 0 <= t < llm.engine.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (size {llm.engine.vocab_size})",
                               param="tokens")
            try:
                return {"prompt": _require(llm.tokenizer).decode(req.tokens)}
            except RequestError as e:
                raise APIError(400, str(e), param="tokens") from None

    return app


def _require(tok):
    if tok is None:
        raise RequestError("this model folder has no tokenizer")
    return tok


async def _reap(pool: ModelPool) -> None:
    """Unload models whose keep_alive ran out (checked each second)."""
    while True:
        await asyncio.sleep(1.0)
        if any(e.keep_until is not None and e.loaded for e in pool.entries.values()):
            try:
                for name in await run_in_threadpool(pool.reap):
                    log.info("unloaded %s: its keep_alive ran out", name)
            except Exception:  # noqa: BLE001 - the reaper must outlive a failed unload
                log.exception("unloading an expired model failed")


class _Using:
    """A request's hold on a loaded model: ``await ready()`` loads it if needed (in a thread)."""

    def __init__(self, st: State, name):
        self.st, self.name = st, st.model(name)
        self._cm = None
        self.entry = None

    def __enter__(self):
        return self

    async def ready(self):
        cm = self.st.pool.use(self.name)
        self.entry = await run_in_threadpool(cm.__enter__)
        self._cm = cm
        return self.entry

    def release(self) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)

    def __exit__(self, *exc):
        self.release()


def _message(m: dict) -> dict:
    if m.get("content") is None:
        m["content"] = ""
    else:
        m["content"] = text_content(m["content"])
    return m


def _prompts(llm, kind: str, body: dict, tp) -> list[tuple[Optional[str], list[int]]]:
    tok = llm.tokenizer
    if kind == "chat":
        return [(None, tools_mod.chat_ids(tok, [_message(dict(m)) for m in body["messages"]], tp))]
    out = []
    for p in prompts_of(body):
        out.append((p, _require(tok).encode(p)) if isinstance(p, str) else (None, list(p)))
    return out


async def _generate(st: State, kind: str, req: Union[CompletionRequest, ChatCompletionRequest]):
    t0 = time.perf_counter()  # TTFT counts from here: a model's load on first use is part of it
    name = req.model
    status = 500
    if req.model_extra:
        log.info("ignoring fields that are not OpenAI's or vLLM's: %s", ", ".join(sorted(req.model_extra)))
    body = req.model_dump(by_alias=True)
    if kind == "chat":
        body["messages"] = [m.model_dump(exclude_none=True) for m in req.messages]
    cascade = getattr(st.pool, "cascades", {}).get(name)
    if cascade is not None:  # moetier serve --cascade NAME=...: moetier/cascade_serve.py answers it
        from ..cascade_serve import generate as cascade_generate

        return await cascade_generate(st, kind, req, body, cascade)
    using: Optional[_Using] = None
    streaming = False
    admitted = False
    try:
        using = _Using(st, name)
        tp = tools_mod.plan(body) if kind == "chat" else None
        params = sampling_params(body, kind, tp.schema if tp is not None else None)
        if params.structured_outputs is not None:
            params.structured_outputs.grammar_text()  # a bad schema or regex is a 400 before anything runs
        keep = parse_keep_alive(req.keep_alive)
        st.admit()
        admitted = True
        entry = await using.ready()
        llm = entry.llm
        prompts = _prompts(llm, kind, body, tp)
        for _, ids in prompts:
            llm.engine.check_prompt(ids)
            check_context(len(ids), params.max_tokens, llm.engine.max_model_len)
        st.pool.keep_alive(name, keep if keep is not None else st.keep_alive)
        opts = body.get("stream_options") or {}
        job = Job(kind, name, prompts, params, bool(req.stream), bool(opts.get("include_usage")),
                  echo=kind == "completion" and bool(body.get("echo")), echo_only=echo_only(body, kind), tools=tp,
                  token_ids=bool(body.get("return_token_ids")))
        run = Run(job, entry, st.metrics, t0)
        await run.start()
        status = 200
        if job.stream:
            streaming = True
            return StreamingResponse(_stream(st, using, run), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return JSONResponse(await run.body())
        finally:
            run.abort()
    except ParamError as e:
        status = 400
        raise APIError(400, str(e), param=e.param, code=e.code) from None
    except RequestError as e:
        status = 400
        param = "response_format" if body.get("response_format") and "structured" in str(e) else (
            "messages" if kind == "chat" else "prompt")
        raise APIError(400, str(e), param=param, code="context_length_exceeded" if "context" in str(e) else None) \
            from None
    except APIError as e:
        status = e.status
        raise
    finally:
        if not streaming:
            if using is not None:
                using.release()
            if admitted:
                st.leave()
        st.metrics.request_done(name if name in st.pool.entries else "unknown", status)


async def _stream(st: State, using: _Using, run: Run):
    try:
        async for part in run.sse():
            yield part
    finally:
        run.abort()
        using.release()
        st.leave()
