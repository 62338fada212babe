"""``moetier serve --ray``: the OpenAI app on Ray Serve, one deployment per model.

``MoetierRouter`` (the ingress) reads ``body.model`` and forwards the HTTP request, as it came, to
that model's deployment ``MoetierModel-<id>``; each of its replicas holds the one model and runs
moetier's own FastAPI app (:func:`moetier.serve.app.create_app`) in-process on it
(:mod:`moetier.cluster.asgi`), so validation, errors and the SSE stream are those of ``moetier
serve``, and a request only ever reaches a replica that holds its model. Ray Serve scales each
model's replicas between its ``min`` (0: none until the first request, which waits for the load)
and ``max`` on ongoing requests. Where a new replica goes is moetier's policy
(:mod:`moetier.cluster.placement`): each node reports what it holds of the checkpoint, and the
deployment's ``label_selector`` / ``fallback_strategy`` put replicas on the nodes that start it
fastest. A stream whose replica is drained or dies moves to another replica of the model
(:mod:`moetier.cluster.migrate`); with none, it ends with an OpenAI-shaped error event and
``[DONE]``: never a hung stream. A replica that dies before answering is a 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from ..errors import MoetierError
from .placement import Rates, actor_options, probe, rank

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
        self.who = self.info()

    async def call(self, method: str, path: str, query: bytes, headers: list, body: bytes):
        """This replica (:meth:`info`), then the app's response to one request: ``(status, headers)``,
        then the body's chunks."""
        from .asgi import call

        await self.life.start()
        yield self.who
        async for item in call(self.app, method, path, query, headers, body):
            yield item

    def info(self) -> dict:
        import os

        import ray
        from ray import serve

        return {"replica": serve.get_replica_context().replica_id.unique_id, "model": self.name, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "load_s": round(self.load_s, 3)}


class MoetierRouter:
    """The ingress: /v1/models and /health here, each model's requests to that model's replicas;
    ``GET /cluster``: where each model's replicas may go and why, the streams in flight and how
    many moved."""

    def __init__(self, handles: dict, api_key: Optional[str] = None, placement: Optional[dict] = None):
        self.handles = handles
        self.api_key = api_key
        self.placement = placement or {}
        self.created = int(time.time())
        self.streams: dict[str, dict] = {}  # in flight: the model, its replica, tokens so far
        self.moved = {"drained": 0, "lost": 0, "failed": 0}  # streams moved off a drained / dead replica; ended
        self.seen: dict[str, dict] = {}  # replica id -> what it said of itself (its node, pid, load time)

    def _card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "moetier"}

    async def __call__(self, request):
        import hmac

        from starlette.responses import JSONResponse

        path, method = request.url.path, request.method
        if path == "/health":
            return JSONResponse({"status": "ok", "models": list(self.handles)})
        if self.api_key is not None and (path.startswith("/v1") or path == "/cluster"):
            got = request.headers.get("authorization", "")
            if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), self.api_key.encode())):
                return _error(401, "incorrect API key provided", "invalid_api_key")
        if path == "/v1/models" and method == "GET":
            return JSONResponse({"object": "list", "data": [self._card(m) for m in self.handles]})
        if path == "/cluster" and method == "GET":
            return JSONResponse(self._status())
        body = await request.body()
        if path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):].removesuffix("/load").removesuffix("/unload")
            if name not in self.handles:
                return _error(404, f"the model {name!r} does not exist", "model_not_found")
        elif path in ROUTED and method == "POST":
            try:
                parsed = json.loads(body)
                name = parsed.get("model")
            except (ValueError, AttributeError):
                return _error(400, "the request body is not a JSON object", "invalid_json")
            if name not in self.handles:
                return _error(404, f"the model {name!r} does not exist; this server has {', '.join(self.handles)}",
                              "model_not_found")
            from .migrate import carried

            kind = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}.get(path)
            if kind is not None and carried(kind, parsed):
                return await self._carried(name, kind, parsed, request)
        else:
            return _error(404, f"no route {method} {path}", "not_found")
        return await self._forward(name, request, body)

    def _status(self) -> dict:
        """``GET /cluster``: the placement plan, the running replicas, the streams in flight, the moves."""
        from .replica_sets import running

        replicas = {m: [self.seen.get(i, {"replica": i}) for i in sorted(running(_dep_name(m)) or [])]
                    for m in self.handles}
        return {"placement": self.placement, "replicas": replicas, "streams": list(self.streams.values()),
                "moved": self.moved}

    async def _open(self, name: str, method: str, path: str, query: bytes, headers: list, body: bytes):
        """Send one request to the model's deployment: its stream, the replica, the status and headers."""
        gen = self.handles[name].options(stream=True).call.remote(method, path, query, headers, body)
        who = await gen.__anext__()
        self.seen[who["replica"]] = who
        status, out_headers = await gen.__anext__()
        return gen, who, status, out_headers

    @staticmethod
    def _headers(request) -> list:
        return [(k.lower(), v) for k, v in request.headers.raw if k.lower() not in (b"authorization", b"content-length")]

    async def _forward(self, name: str, request, body: bytes):
        from starlette.responses import StreamingResponse

        try:
            gen, _, status, out_headers = await self._open(name, request.method, request.url.path,
                                                           request.url.query.encode(), self._headers(request), body)
        except Exception as e:  # the replica died (or could not start) before answering
            return _unavailable(name, e)
        media = dict(out_headers).get("content-type")

        async def rest():
            from .migrate import lost_event

            try:
                async for chunk in gen:
                    yield chunk
            except Exception as e:  # mid-stream: an error event and [DONE], never a hung stream
                log.warning("%s: the replica died mid-response: %s", name, e)
                if media and media.startswith("text/event-stream"):
                    yield lost_event(name)

        return StreamingResponse(rest(), status_code=status, media_type=media,
                                 headers={k: v for k, v in out_headers if k.lower() not in HOP | {"content-type"}})

    async def _carried(self, name: str, kind: str, parsed: dict, request):
        """A stream that moves to another replica when its own is drained or dies (moetier.cluster.migrate)."""
        from starlette.responses import StreamingResponse

        from .migrate import Tokens

        from .replica_sets import running

        headers = self._headers(request)
        fwd = json.dumps(dict(parsed, return_token_ids=True)).encode()
        for attempt in range(3):
            try:
                gen, who, status, out_headers = await self._open(name, "POST", request.url.path, b"", headers, fwd)
                break
            except Exception as e:  # sent to a replica that had just died: Serve drops it, another may answer
                if attempt == 2 or not running(_dep_name(name)):
                    return _unavailable(name, e)
                await asyncio.sleep(0.2 * (attempt + 1))
        keep = {k: v for k, v in out_headers if k.lower() not in HOP | {"content-type"}}
        media = dict(out_headers).get("content-type")
        if status != 200:  # the app's own answer (a 400...): as it is
            return StreamingResponse(_chunks(gen), status_code=status, media_type=media, headers=keep)
        tokens = Tokens(kind, bool(parsed.get("return_token_ids")))
        sid = uuid.uuid4().hex
        self.streams[sid] = {"model": name, **who, "tokens": 0, "moves": 0}
        return StreamingResponse(self._follow(sid, name, kind, parsed, headers, tokens, gen, who),
                                 status_code=200, media_type=media, headers=keep)

    async def _follow(self, sid, name, kind, parsed, headers, tokens, gen, who):
        """The client's stream: the replica's events as they come; on a drain, the rest from another
        replica (the drained one streams on until that one has answered, and on where none can);
        on a loss, the rest from another replica, or the replica_lost error."""
        from .migrate import MAX_MOVES, lost_event, next_or_change
        from .replica_sets import Watch, running

        dep = _dep_name(name)
        watch = Watch()
        pending = asyncio.ensure_future(gen.__anext__())
        moves, stay = 0, False  # stay: a drained replica that nothing could take over from streams on
        try:
            while True:
                watch.event.clear()
                now = running(dep)
                if now and who["replica"] not in now and not stay and not tokens.finished:
                    # drained: Serve sends it nothing new and stops it once this ends; move while it still runs
                    moved = None
                    if tokens.prompt_ids is not None and moves < MAX_MOVES:
                        moved = await self._continue(name, kind, parsed, headers, tokens)
                    if moved is None or moved == "finished":
                        stay = True
                        continue
                    outcome = "drained"
                else:
                    what, item = await next_or_change(gen, pending, watch)
                    if what == "change":
                        continue
                    if what == "item":
                        for out in tokens.feed(item):
                            yield out
                        self.streams[sid]["tokens"] = len(tokens.ids)
                        if tokens.done:
                            return
                        pending = asyncio.ensure_future(gen.__anext__())
                        continue
                    log.warning("%s: replica %s lost mid-stream: %s", name, who["replica"], item)
                    if tokens.failed or tokens.finished:  # nothing left to generate: close the stream
                        yield _finish(tokens, kind, parsed, name)
                        return
                    others = (running(dep) or frozenset()) - {who["replica"]}
                    moved = None
                    if others and moves < MAX_MOVES and tokens.prompt_ids is not None:
                        moved = await self._continue(name, kind, parsed, headers, tokens)
                    if moved == "finished":
                        yield _finish(tokens, kind, parsed, name)
                        return
                    if moved is None:
                        self.moved["failed"] += 1
                        yield lost_event(name)
                        return
                    outcome = "lost"
                pending.cancel()
                gen.cancel()  # the first request ends there; what it generated since goes unsent
                moves += 1
                self.moved[outcome] += 1
                gen, who = moved
                log.info("%s: stream moved to replica %s after %d tokens (%s)", name, who["replica"],
                         len(tokens.ids), outcome)
                tokens.resumed = True
                self.streams[sid].update(who, moves=moves)
                pending = asyncio.ensure_future(gen.__anext__())
        finally:
            watch.close()
            self.streams.pop(sid, None)
            if not tokens.done:  # the client went away: the replica stops generating
                pending.cancel()
                gen.cancel()

    async def _continue(self, name, kind, parsed, headers, tokens):
        """The continuation's stream and replica on another replica, "finished" when nothing is left to
        generate, None when it cannot be started."""
        from .migrate import asked_max_tokens, continuation

        limit = asked_max_tokens(kind, parsed)
        for attempt in range(3):
            try:
                if limit is None:  # chat without max_tokens: up to the context's end
                    card = await self._json(name, "GET", f"/v1/models/{name}", headers)
                    limit = card["max_model_len"] - len(tokens.prompt_ids)
                if limit - len(tokens.ids) <= 0:
                    return "finished"
                body = json.dumps(continuation(parsed, tokens.prompt_ids, tokens.ids, limit)).encode()
                gen, who, status, _ = await self._open(name, "POST", "/v1/completions", b"", headers, body)
            except Exception as e:  # routed to the replica that just died: Serve learns it, try again
                log.warning("%s: the continuation found no replica: %s", name, e)
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if status != 200:
                text = b"".join([c async for c in _chunks(gen)])
                log.warning("%s: the continuation was refused (%s): %s", name, status, text[:300])
                return None
            return gen, who
        return None

    async def _json(self, name, method, path, headers):
        gen, _, status, _ = await self._open(name, method, path, b"", headers, b"")
        return json.loads(b"".join([c async for c in _chunks(gen)]))


async def _chunks(gen):
    async for c in gen:
        yield c


def _finish(tokens, kind: str, parsed: dict, name: str) -> bytes:
    """What a stream whose generation had ended still owes the client: the usage chunk, [DONE]."""
    from ..openai_bodies import usage_chunk
    from .migrate import data

    out = b""
    if not tokens.failed and (parsed.get("stream_options") or {}).get("include_usage"):
        out += data(usage_chunk(kind, name, tokens.rid, len(tokens.prompt_ids or []), len(tokens.ids)))
    return out + data("[DONE]")


def _unavailable(name: str, e: Exception):
    log.warning("%s: no answer from a replica: %s", name, e)
    return _error(503, f"the model {name!r} has no replica able to answer: {str(e).splitlines()[0][:200]}",
                  "replica_unavailable", "server_error")


def _dep_name(name: str) -> str:
    return f"MoetierModel-{_safe(name)}"


def node_reports(models: dict[str, str], timeout_s: float = 60.0) -> dict[str, dict]:
    """What each live node holds of each model: {node id: :func:`~moetier.cluster.placement.probe`},
    asked of every node by a task pinned there; a node that does not answer is left out."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .connect import alive_nodes, import_ray

    ray = import_ray()
    task = ray.remote(num_cpus=0)(probe)
    refs = {n["NodeID"]: task.options(name="MoetierProbe", scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(models) for n in alive_nodes()}
    out = {}
    for node, ref in refs.items():
        try:
            out[node] = ray.get(ref, timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - a node lost or too slow: no replica is steered there
            log.warning("node %s did not report what it holds: %s", node, e)
    return out


def plan_placement(models: dict[str, str], reports: dict[str, dict], rates: Rates) -> tuple[dict, dict]:
    """Per model: the deployment's placement options and the plan in words (nodes fastest first)."""
    options, plan = {}, {}
    for name in models:
        ranked = rank(reports, name, rates)
        if not ranked:
            raise MoetierError(f"no node of the cluster can start {name!r} from {models[name]!r} (a local path "
                               "must exist at the same place on the nodes that serve it)")
        options[name] = actor_options(ranked, len(reports))
        plan[name] = [{"node_id": n, "startup_s": est, **reports[n][name]} for est, n in ranked]
    return options, plan


def build_app(models: dict[str, str], llm_options: dict, scales: dict[str, Scale], threads: Optional[int] = None,
              api_key: Optional[str] = None, max_requests: int = 256, target_ongoing: int = 8,
              reports: Optional[dict] = None, rates: Optional[Rates] = None):
    """The Serve application: a MoetierRouter over one MoetierModel deployment per model, each
    deployment's replicas steered to the nodes that start its model fastest. ``reports``: what each
    node holds (default: asked of every node now, :func:`node_reports`); ``rates``: the tiers' rates."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    gpus = 1 if str(llm_options.get("device", "cpu")).startswith("cuda") else 0
    options, plan = plan_placement(models, node_reports(models) if reports is None else reports, rates or Rates())
    handles = {}
    for name, path in models.items():
        # a version of what the replica is: a redeploy that changes only the replica bounds scales, not reloads
        version = _version(name, path, llm_options, threads, max_requests, options[name])
        dep = serve.deployment(MoetierModel, name=_dep_name(name), max_ongoing_requests=max_requests,
                               ray_actor_options={"num_cpus": threads or 1, "num_gpus": gpus, **options[name]},
                               request_router_config=RequestRouterConfig(
                                   request_router_class="moetier.cluster.routing:MoetierRequestRouter"),
                               graceful_shutdown_wait_loop_s=0.5, **scales[name].config(target_ongoing))
        handles[name] = _pinned(dep, version).bind(name, path, llm_options, threads, max_requests)
    router = serve.deployment(MoetierRouter, name="MoetierRouter", ray_actor_options={"num_cpus": 0},
                              max_ongoing_requests=max(1000, max_requests * len(models)))
    return _pinned(router, _version(sorted(models), api_key, plan)).bind(handles, api_key, plan)


def _pinned(dep, version: str):
    """``dep`` with a version of its own: ``serve.run`` otherwise gives every deployment a fresh one,
    and a redeploy restarts every replica even where only the bounds changed. (Ray Serve keeps
    the option internal; where it is gone, a redeploy restarts the replicas.)"""
    try:
        return dep.options(version=version, _internal=True)
    except (TypeError, ValueError):
        return dep


def _version(*what) -> str:
    import hashlib

    from .. import __version__

    return hashlib.sha256(json.dumps([__version__, *what], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def run(models: dict[str, str], llm_options: dict, scales: dict[str, Scale], address: Optional[str] = "auto",
        host: str = "127.0.0.1", port: int = 8000, threads: Optional[int] = None, api_key: Optional[str] = None,
        max_requests: int = 256, blocking: bool = True, name: str = "moetier", reports: Optional[dict] = None,
        rates: Optional[Rates] = None):
    """Deploy the app on the cluster at ``address`` with its HTTP proxy on ``host:port`` (on the head
    node; put a load balancer in front for more), with
    ``blocking``, serve until interrupted, then delete it. Returns the router's handle otherwise.
    ``reports``, ``rates``: see :func:`build_app`."""
    from .connect import connect, import_ray

    owned = connect(address)
    ray = import_ray()
    from ray import serve

    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    handle = serve.run(build_app(models, llm_options, scales, threads, api_key, max_requests, reports=reports,
                                 rates=rates), name=name, route_prefix="/")
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
