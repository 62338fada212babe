"""HTTP endpoints (stdlib ``ThreadingHTTPServer``): one handler thread per connection."""

from __future__ import annotations

import hmac
import json
import logging
import queue
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from ..batch_file import _text_content
from ..errors import RequestError
from ..tokenizer import chat_prompt, require
from .protocol import APIError, ParsedRequest, chunk, new_id, parse_request, response, usage_chunk
from .worker import EngineWorker

log = logging.getLogger(__name__)

ROUTES = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
MAX_BODY = 32 * 2**20


class Server(ThreadingHTTPServer):
    """The HTTP server plus what the handlers need: the worker, model name and API key."""

    daemon_threads = True

    def __init__(self, addr, llm, model_name: str, api_key: Optional[str]):
        super().__init__(addr, Handler)
        self.llm = llm
        self.model_name = model_name
        self.api_key = api_key
        self.created = int(time.time())
        self.worker = EngineWorker(llm).start()

    def server_close(self) -> None:
        self.worker.stop()
        super().server_close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, fmt, *args):  # route to logging, not stderr
        log.info("%s " + fmt, self.address_string(), *args)

    # -- plumbing -------------------------------------------------------------------------------

    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: APIError) -> None:
        self._send_json(e.status, e.body())

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
                w = self.server.worker
                return self._send_json(200, {"status": "ok", "requests_live": w.live(), "aborted": w.aborted})
            self._auth()
            if path == "/v1/models":
                return self._send_json(200, {"object": "list", "data": [
                    {"id": self.server.model_name, "object": "model", "created": self.server.created,
                     "owned_by": "moetier"}]})
            raise APIError(404, f"no route GET {path}", code="not_found")
        except APIError as e:
            self._error(e)

    def do_POST(self):
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
            req = parse_request(body, kind, [self.server.model_name])
            ids = self._prompt_ids(req)
            self._run(req, ids)
        except APIError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug answers 500 for this request; the server keeps running
            log.exception("request failed")
            try:
                self._error(APIError(500, f"internal error: {e}", type="server_error"))
            except OSError:
                self.close_connection = True

    def _prompt_ids(self, req: ParsedRequest) -> list[int]:
        llm = self.server.llm
        try:
            if req.kind == "chat":
                msgs = [dict(m, content=_text_content(m["content"])) for m in req.body["messages"]]
                return chat_prompt(llm.tokenizer, msgs)
            p = req.body["prompt"]
            p = p[0] if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)) else p
            return require(llm.tokenizer, "a text prompt").encode(p) if isinstance(p, str) else list(p)
        except RequestError as e:
            raise APIError(400, str(e), param="messages" if req.kind == "chat" else "prompt") from None

    def _run(self, req: ParsedRequest, ids: list[int]) -> None:
        worker = self.server.worker
        rid, q = worker.submit(ids, req.params)
        kind, payload = q.get()
        if kind == "error":
            raise APIError(400, str(payload), param="messages" if req.kind == "chat" else "prompt",
                           code="context_length_exceeded" if "context" in str(payload) else None)
        cid = new_id(req.kind)
        try:
            if req.stream:
                self._stream(req, cid, q, len(ids))
            else:
                while True:
                    kind, payload = q.get()
                    if kind == "done":
                        return self._send_json(200, response(req, cid, payload, len(ids)))
                    if kind == "error":
                        raise APIError(500, f"generation failed: {payload}", type="server_error")
        finally:
            worker.abort(rid)  # a no-op once finished; frees the slot when the client went away

    def _stream(self, req: ParsedRequest, cid: str, q: queue.Queue, prompt_tokens: int) -> None:
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
                index, text, finish = payload
                send(chunk(req, cid, index, text, finish))
            elif kind == "done":
                if req.include_usage:
                    send(usage_chunk(req, cid, prompt_tokens, sum(len(o.token_ids) for o in payload)))
                send("[DONE]")
                return
            else:
                send(APIError(500, f"generation failed: {payload}", type="server_error").body())
                send("[DONE]")
                return


def make_server(llm, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                api_key: Optional[str] = None) -> Server:
    """A bound server (``port=0``: a free one, see ``server.server_address``); call ``serve_forever()``."""
    return Server((host, port), llm, model_name, api_key)


def serve(llm, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None) -> None:
    """Serve until interrupted."""
    server = make_server(llm, model_name, host, port, api_key)
    h, p = server.server_address[:2]
    print(f"moetier: serving {model_name} on http://{h}:{p}/v1", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
