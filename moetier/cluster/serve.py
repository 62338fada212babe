"""``moetier serve --ray``: the OpenAI app on Ray Serve, one deployment per model.

``MoetierRouter`` (the ingress) reads ``body.model`` and forwards the HTTP request, as it came, to
that model's deployment ``MoetierModel-<id>``; each of its replicas holds the one model and runs
moetier's own FastAPI app (:func:`moetier.serve.app.create_app`) in-process on it
(:mod:`moetier.cluster.asgi`), so validation, errors and the SSE stream are those of ``moetier
serve``, and a request only ever reaches a replica that holds its model. Ray Serve scales each
model's replicas between its ``min`` (0: none until the first request, which waits for the load)
and ``max`` on ongoing requests. A replica that dies before answering is a 503, one that dies
mid-stream ends the stream with an OpenAI-shaped error event and ``[DONE]``: never a hung stream.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Optional

from ..errors import MoetierError

log = logging.getLogger(__name__)

ROUTED = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")  # by body.model
HOP = {"content-length", "transfer-encoding", "connection", "date", "server"}  # not forwarded back


@dataclass
class Scale:
    """A model's replica bounds: ``min`` (0: loaded on the first request) to ``max``."""

    min: int = 1
    max: int = 1

    def config(self, target_ongoing: int) -> dict:
        if self.min == self.max:
            return {"num_replicas": self.min}
        return {"autoscaling_config": {"min_replicas": self.min, "max_replicas": self.max,
                                       "initial_replicas": self.min, "target_ongoing_requests": target_ongoing,
                                       "upscale_delay_s": 2.0, "downscale_delay_s": 60.0}}


def parse_scales(values: list[str], models: dict[str, str]) -> dict[str, Scale]:
    """``--replicas [ID=]MIN:MAX`` values (no ID: every model) as {id: Scale}; default 1:1."""
    scales = {m: Scale() for m in models}
    for v in values:
        name, sep, rng = v.rpartition("=")
        lo, colon, hi = rng.partition(":")
        try:
            s = Scale(int(lo), int(hi) if colon else int(lo))
        except ValueError:
            raise MoetierError(f"--replicas {v!r}: give MIN:MAX or ID=MIN:MAX, e.g. 0:2") from None
        if s.min < 0 or s.max < max(1, s.min):
            raise MoetierError(f"--replicas {v!r}: need 0 <= MIN <= MAX and MAX >= 1")
        if sep and name not in models:
            raise MoetierError(f"--replicas {v!r}: no model {name!r} (the models are {', '.join(models)})")
        for m in ([name] if sep else models):
            scales[m] = s
    return scales


def _error(status: int, message: str, code: Optional[str] = None, type: str = "invalid_request_error"):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type, "param": None, "code": code}}, status)


class MoetierModel:
    """One model's replica: the model loaded at start, moetier's FastAPI app over it."""

    def __init__(self, name: str, path: str, llm_options: dict, threads: Optional[int] = None,
                 max_requests: int = 256):
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        from ..llm import LLM
        from ..ram import resolve_budget
        from ..serve.app import create_app
        from ..serve.pool import ModelPool
        from .asgi import Lifespan

        opts = dict(llm_options)
        total = opts.get("device_memory") or (opts.get("host_memory") if opts.get("device", "cpu") == "cpu" else None)

        def load(_name, p, device_memory):
            return LLM(**{**opts, "model": p, "device_memory": device_memory,
                          "host_memory": opts.get("host_memory") if device_memory is not None else None})

        self.name = name
        self.pool = ModelPool({name: path}, load, resolve_budget(total, opts.get("device", "cpu")))
        t0 = time.perf_counter()
        self.pool.load(name)  # the replica is ready once its model is: Serve routes to it only then
        self.load_s = time.perf_counter() - t0
        self.app = create_app(self.pool, None, max_requests)
        self.life = Lifespan(self.app)

    async def call(self, method: str, path: str, query: bytes, headers: list, body: bytes):
        """The app's response to one request: ``(status, headers)``, then the body's chunks."""
        from .asgi import call

        await self.life.start()
        async for item in call(self.app, method, path, query, headers, body):
            yield item

    def info(self) -> dict:
        import os

        import ray

        return {"model": self.name, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "load_s": round(self.load_s, 3)}


class MoetierRouter:
    """The ingress: /v1/models and /health here, each model's requests to that model's replicas."""

    def __init__(self, handles: dict, api_key: Optional[str] = None):
        self.handles = handles
        self.api_key = api_key
        self.created = int(time.time())

    def _card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "moetier"}

    async def __call__(self, request):
        import hmac

        from starlette.responses import JSONResponse

        path, method = request.url.path, request.method
        if path == "/health":
            return JSONResponse({"status": "ok", "models": list(self.handles)})
        if self.api_key is not None and path.startswith("/v1"):
            got = request.headers.get("authorization", "")
            if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), self.api_key.encode())):
                return _error(401, "incorrect API key provided", "invalid_api_key")
        if path == "/v1/models" and method == "GET":
            return JSONResponse({"object": "list", "data": [self._card(m) for m in self.handles]})
        body = await request.body()
        if path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):].removesuffix("/load").removesuffix("/unload")
            if name not in self.handles:
                return _error(404, f"the model {name!r} does not exist", "model_not_found")
        elif path in ROUTED and method == "POST":
            try:
                name = json.loads(body).get("model")
            except (ValueError, AttributeError):
                return _error(400, "the request body is not a JSON object", "invalid_json")
            if name not in self.handles:
                return _error(404, f"the model {name!r} does not exist; this server has {', '.join(self.handles)}",
                              "model_not_found")
        else:
            return _error(404, f"no route {method} {path}", "not_found")
        return await self._forward(name, request, body)

    async def _forward(self, name: str, request, body: bytes):
        from starlette.responses import StreamingResponse

        headers = [(k.lower(), v) for k, v in request.headers.raw if k.lower() != b"authorization"]
        gen = self.handles[name].options(stream=True).call.remote(
            request.method, request.url.path, request.url.query.encode(), headers, body)
        try:
            status, out_headers = await gen.__anext__()
        except Exception as e:  # the replica died (or could not start) before answering
            log.warning("%s: no answer from a replica: %s", name, e)
            return _error(503, f"the model {name!r} has no replica able to answer: {str(e).splitlines()[0][:200]}",
                          "replica_unavailable", "server_error")
        media = dict(out_headers).get("content-type")

        async def rest():
            try:
                async for chunk in gen:
                    yield chunk
            except Exception as e:  # mid-stream: an error event and [DONE], never a hung stream
                log.warning("%s: the replica died mid-response: %s", name, e)
                if media and media.startswith("text/event-stream"):
                    err = {"error": {"message": f"the replica serving {name!r} was lost mid-stream",
                                     "type": "server_error", "param": None, "code": "replica_lost"}}
                    yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()

        return StreamingResponse(rest(), status_code=status, media_type=media,
                                 headers={k: v for k, v in out_headers if k.lower() not in HOP | {"content-type"}})


def build_app(models: dict[str, str], llm_options: dict, scales: dict[str, Scale], threads: Optional[int] = None,
              api_key: Optional[str] = None, max_requests: int = 256, target_ongoing: int = 8):
    """The Serve application: a MoetierRouter over one MoetierModel deployment per model."""
    from ray import serve

    gpus = 1 if str(llm_options.get("device", "cpu")).startswith("cuda") else 0
    handles = {}
    for name, path in models.items():
        dep = serve.deployment(MoetierModel, name=f"MoetierModel-{_safe(name)}", max_ongoing_requests=max_requests,
                               ray_actor_options={"num_cpus": threads or 1, "num_gpus": gpus},
                               **scales[name].config(target_ongoing))
        handles[name] = dep.bind(name, path, llm_options, threads, max_requests)
    router = serve.deployment(MoetierRouter, name="MoetierRouter", ray_actor_options={"num_cpus": 0},
                              max_ongoing_requests=max(1000, max_requests * len(models)))
    return router.bind(handles, api_key)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def run(models: dict[str, str], llm_options: dict, scales: dict[str, Scale], address: Optional[str] = "auto",
        host: str = "127.0.0.1", port: int = 8000, threads: Optional[int] = None, api_key: Optional[str] = None,
        max_requests: int = 256, blocking: bool = True, name: str = "moetier"):
    """Deploy the app on the cluster at ``address`` with its HTTP proxy on ``host:port`` (on the head
    node; put a load balancer in front for more), with
    ``blocking``, serve until interrupted, then delete it. Returns the router's handle otherwise."""
    from .connect import connect, import_ray

    owned = connect(address)
    ray = import_ray()
    from ray import serve

    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    handle = serve.run(build_app(models, llm_options, scales, threads, api_key, max_requests), name=name,
                       route_prefix="/")
    if not blocking:
        return handle
    print(f"moetier: serving {', '.join(models)} on Ray Serve at http://{host}:{port}/v1", flush=True)
    import signal

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # SIGTERM as Ctrl-C: the app is deleted, a local cluster stopped
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(name)
        if owned:
            ray.shutdown()
    return None
