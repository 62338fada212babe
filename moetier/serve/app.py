"""HTTP endpoints (stdlib ``ThreadingHTTPServer``): one handler thread per connection."""

from __future__ import annotations

import hmac
import json
import logging
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from ..batch_file import _text_content, logprobs_of
from ..errors import CheckpointError, RequestError
from ..tokenizer import chat_prompt, require
from .metrics import Metrics
from .pool import ModelPool
from .protocol import APIError, ParsedRequest, chunk, new_id, parse_request, response, usage_chunk

log = logging.getLogger(__name__)

ROUTES = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
MAX_BODY = 32 * 2**20
DEFAULT_MAX_REQUESTS = 256


class Server(ThreadingHTTPServer):
    """The HTTP server plus what the handlers share: the model pool, API key, request cap and metrics."""

    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: a burst of clients must not be reset (default 5)

    def __init__(self, addr, pool: ModelPool, api_key: Optional[str], max_requests: int = DEFAULT_MAX_REQUESTS):
        super().__init__(addr, Handler)
        self.pool = pool
        self.api_key = api_key
        self.max_requests = max_requests
        self.created = int(time.time())
        self.metrics = Metrics()
        self._inflight = 0
        self._inflight_lock = threading.Lock()

    def admit(self) -> None:
        """Count a request in, or refuse it (429) when ``max_requests`` are already being served."""
        with self._inflight_lock:
            if self._inflight >= self.max_requests:
                raise APIError(429, f"the server is serving its limit of {self.max_requests} requests; retry "
                                    "shortly", type="requests", code="rate_limit_exceeded")
            self._inflight += 1

    def leave(self) -> None:
        with self._inflight_lock:
            self._inflight -= 1

    def inflight(self) -> int:
        return self._inflight

    def server_close(self) -> None:
        self.pool.close()
        super().server_close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, fmt, *args):  # route to logging, not stderr
        log.info("%s " + fmt, self.address_string(), *args)

    # -- plumbing -------------------------------------------------------------------------------

    def _send_json(self, status: int, obj: dict, headers: Optional[dict] = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: APIError) -> None:
        # a full server or a busy model clears up within a request's time: tell clients when to retry
        self._send_json(e.status, e.body(), {"Retry-After": "1"} if e.status in (429, 503) else None)

    def _auth(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        got = self.headers.get("Authorization", "")
        if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), key.encode())):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    def _read_body(self) -> bytes:
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            raise APIError(400, "bad Content-Length header") from None
        if n > MAX_BODY:
            self.close_connection = True
            raise APIError(413, f"the request body is {n} bytes; the limit is {MAX_BODY}")
        return self.rfile.read(n) if n > 0 else b""

    # -- endpoints ------------------------------------------------------------------------------

    def do_GET(self):
        try:
            path = self.path.split("?", 1)[0]
            if path == "/health":
                loaded = self.server.pool.loaded()
                return self._send_json(200, {"status": "ok", "requests_inflight": self.server.inflight(),
                                             "requests_live": sum(m.worker.live() for m in loaded),
                                             "models_loaded": [m.name for m in loaded],
                                             "aborted": sum(m.worker.aborted for m in loaded)})
            if path == "/metrics":
                data = self.server.metrics.render(self.server.pool, self.server.inflight()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self._auth()
            if path == "/v1/models":
                return self._send_json(200, {"object": "list", "data": [
                    {"id": e.name, "object": "model", "created": self.server.created, "owned_by": "moetier",
                     "loaded": e.loaded} for e in self.server.pool.entries.values()]})
            raise APIError(404, f"no route GET {path}", code="not_found")
        except APIError as e:
            self._error(e)
        except Exception as e:  # a bug answers 500; the server keeps running
            log.exception("GET %s failed", self.path)
            self._error(APIError(500, f"internal error: {e}", type="server_error"))

    def _record(self, model: str, status: int) -> None:
        """Count this request in the metrics, once."""
        if not self._recorded:
            self._recorded = True
            self.server.metrics.request_done(model, status)

    def do_POST(self):
        t0 = time.perf_counter()  # TTFT counts from here: a model's load on first use is part of it
        model, status = "unknown", 500  # the metrics' labels: a request that names no served model is "unknown"
        self._recorded = False  # one handler serves every request of a keep-alive connection
        try:
            raw = self._read_body()
            path = self.path.split("?", 1)[0]
            self._auth()
            kind = ROUTES.get(path)
            if kind is None:
                raise APIError(404, f"no route POST {path}", code="not_found")
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
            names = self.server.pool.names()
            if isinstance(body, dict) and body.get("model") in names:
                model = body["model"]
            req = parse_request(body, kind, names)
            self.server.admit()
            try:
                with self.server.pool.use(req.model) as entry:
                    self._run(entry, req, t0)
            finally:
                self.server.leave()
            status = 200
        except APIError as e:
            status = e.status
            self._record(model, status)
            self._error(e)
        except _StreamFailed:
            self.close_connection = True  # the error went out inside the stream
        except (BrokenPipeError, ConnectionResetError):
            status = 499  # the client went away (nginx's code for it)
            self.close_connection = True
        except Exception as e:  # a bug answers 500 for this request; the server keeps running
            log.exception("request failed")
            self._record(model, 500)
            try:
                self._error(APIError(500, f"internal error: {e}", type="server_error"))
            except OSError:
                self.close_connection = True
        finally:
            self._record(model, status)

    def _prompt_ids(self, llm, req: ParsedRequest) -> list[int]:
        try:
            if req.kind == "chat":
                msgs = [dict(m, content=_text_content(m["content"])) for m in req.body["messages"]]
                return chat_prompt(llm.tokenizer, msgs)
            p = req.body["prompt"]
            p = p[0] if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)) else p
            return require(llm.tokenizer, "a text prompt").encode(p) if isinstance(p, str) else list(p)
        except RequestError as e:
            raise APIError(400, str(e), param="messages" if req.kind == "chat" else "prompt") from None

    def _run(self, entry, req: ParsedRequest, t0: float) -> None:
        ids = self._prompt_ids(entry.llm, req)
        worker = entry.worker
        rid, q = worker.submit(ids, req.params)
        kind, payload = q.get()
        if kind == "error":
            if not isinstance(payload, RequestError):
                raise APIError(500, f"the request could not start: {payload}", type="server_error")
            raise APIError(400, str(payload), param="messages" if req.kind == "chat" else "prompt",
                           code="context_length_exceeded" if "context" in str(payload) else None)
        cid = new_id(req.kind)
        timing = _Timing(t0)

        def finished(outs: list) -> None:
            """Count the request before its last bytes go out, so a client that reads /metrics
            right after its answer sees it."""
            self.server.metrics.tokens(req.model, len(ids), sum(len(o.token_ids) for o in outs), timing.ttft(),
                                       timing.tpot(max(len(o.token_ids) for o in outs)))
            self._record(req.model, 200)

        try:
            if req.stream:
                self._stream(entry.llm.tokenizer, req, cid, q, len(ids), timing, finished)
            else:
                outs = _collect(q, timing)
                finished(outs)
                self._send_json(200, response(req, cid, outs, len(ids), entry.llm.tokenizer))
        finally:
            worker.abort(rid)  # a no-op once finished; frees the slot when the client went away

    def _stream(self, tokenizer, req: ParsedRequest, cid: str, q: queue.Queue, prompt_tokens: int,
                timing: "_Timing", finished) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's end
        self.end_headers()
        self.close_connection = True

        def send(obj) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        if req.kind == "chat":  # the role comes first, as OpenAI sends it
            for i in range(req.params.n):
                send(chunk(req, cid, i, "", None, first=True))
        while True:
            kind, payload = q.get()
            if kind == "delta":
                timing.token()
                index, text, finish, lps = payload
                send(chunk(req, cid, index, text, finish,
                           logprobs=logprobs_of(req.kind, lps, tokenizer) if lps else None))
            elif kind == "done":
                timing.done()
                finished(payload)
                if req.include_usage:
                    send(usage_chunk(req, cid, prompt_tokens, sum(len(o.token_ids) for o in payload)))
                send("[DONE]")
                return
            else:
                send(generation_failed(payload).body())
                send("[DONE]")
                raise _StreamFailed(payload)


class _StreamFailed(Exception):
    """Generation failed after the stream's headers went out; the error was sent in the stream."""


class _Timing:
    """When a request arrived, produced its first token and finished: TTFT and TPOT for the metrics."""

    def __init__(self, t0: float):
        self.t0, self.first, self.end = t0, None, None

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def done(self) -> None:
        self.token()
        self.end = time.perf_counter()

    def ttft(self) -> Optional[float]:
        return None if self.first is None else self.first - self.t0

    def tpot(self, longest: int) -> Optional[float]:
        """Mean gap between tokens after the first, ``longest``: the most tokens of one completion
        (the ``n`` completions of a request decode side by side). None with nothing to average."""
        steps = longest - 1
        return (self.end - self.first) / steps if self.end is not None and steps > 0 else None


def _collect(q: queue.Queue, timing: _Timing) -> list:
    """Wait for a non-streamed request's outputs, timing its first delta."""
    while True:
        kind, payload = q.get()
        if kind == "delta":
            timing.token()
        elif kind == "done":
            timing.done()
            return payload
        elif kind == "error":
            raise generation_failed(payload)


def generation_failed(e: Exception) -> APIError:
    """The 500 for a request whose generation failed; a damaged checkpoint (a checksum mismatch,
    a short read: a CheckpointError naming the file, layer and expert) says so in its code."""
    if isinstance(e, CheckpointError):
        return APIError(500, f"generation failed: the model's checkpoint is damaged: {e}", type="server_error",
                        code="checkpoint_error")
    return APIError(500, f"generation failed: {e}", type="server_error")


def make_server(models: dict[str, str], load, host: str = "127.0.0.1", port: int = 8000,
                api_key: Optional[str] = None, budget: Optional[int] = None,
                max_requests: int = DEFAULT_MAX_REQUESTS) -> Server:
    """A bound server over ``models`` (id -> checkpoint path), loaded on demand by ``load(id, path, device_memory)``
    within ``budget`` bytes. ``port=0`` picks a free port (see ``server.server_address``); call ``serve_forever()``."""
    return Server((host, port), ModelPool(models, load, budget), api_key, max_requests)


def serve(server: Server) -> None:
    """Serve until interrupted."""
    h, p = server.server_address[:2]
    names = ", ".join(server.pool.names())
    print(f"moetier: serving {names} on http://{h}:{p}/v1", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
