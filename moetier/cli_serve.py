"""``moetier serve``: models over an OpenAI-compatible HTTP API (moetier/serve/)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .cli_args import add_model_args, llm_options, open_llm
from .errors import MoetierError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve models over an OpenAI-compatible HTTP API",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve one or more models at http://HOST:PORT/v1: GET /v1/models, POST /v1/completions and\n"
                    "/v1/chat/completions (stream=true for server-sent events), GET /health and GET /metrics\n"
                    "(Prometheus). Requests running at the same time share decode steps.\n\n"
                    "Each --model loads on its first request. With a memory budget (--device-memory, or\n"
                    "--host-memory on the CPU) a model that fits loads whole, the least recently used idle\n"
                    "models are evicted to make room, and a model bigger than the budget runs offloaded\n"
                    "within it. Without a budget nothing is evicted.\n\n"
                    "  moetier serve --model demo\n"
                    "  moetier serve --model mixtral=/models/Mixtral-8x7B --model olmoe=/models/OLMoE --device-memory 20GiB")
    add_model_args(p, many=True, required=False)
    p.add_argument("--cascade", action="append", default=None, metavar="NAME=A,B|NAME=FILE",
                   help="also serve the model id NAME as a confidence cascade: A answers, B when A is unsure "
                        "(models by --model id or path; FILE: a moetier cascade calibrate file); repeatable")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 requests (default: $MOETIER_API_KEY, else none)")
    p.add_argument("--max-requests", type=int, default=256, metavar="N",
                   help="requests served at once, all models; more get 429 (default: 256)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="info: model loads and evictions (default); debug: also one line per request; "
                        "warning: problems only")
    p.add_argument("--keep-alive", type=float, default=None, metavar="SECONDS",
                   help="unload a model this long after its last request (default: keep it loaded; a "
                        "request's own keep_alive field overrides this)")
    from .cluster.cli import add_serve_args

    add_serve_args(p)
    p.set_defaults(func=cmd_serve)


def serve_models(values: list[str]) -> dict[str, str]:
    """``--model`` values as {id: path}: ``NAME=PATH``, or a bare path (or ``demo``) that is its own id."""
    models: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        name, path = (name, path) if sep and name and path else (v, v)
        if name in models:
            raise MoetierError(f"--model: the id {name!r} is given twice")
        models[name] = path
    return models


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def cmd_serve(args) -> int:
    from .ram import resolve_budget

    try:
        from .serve import make_server, serve
    except ImportError as e:  # fastapi / uvicorn: the serve extra
        raise MoetierError(f"moetier serve needs the serve extra ({e.name} is missing): pip install fastapi uvicorn "
                           "llguidance, or pip install -e '.[serve]' from a checkout") from None

    models = serve_models(args.model or [])
    from .cascade_cli import serve_cascades

    cascades = serve_cascades(args.cascade or [], models)  # adds the cascades' models to models
    if not models:
        raise MoetierError("moetier serve needs a --model (or a --cascade)")
    if args.ray is not None:  # on Ray Serve (moetier/cluster)
        from .cluster.cli import cmd_serve_ray

        return cmd_serve_ray(args, models, cascades, llm_options(args))
    total = args.device_memory or (args.host_memory if args.device == "cpu" else None)
    budget = resolve_budget(total, args.device)

    from .llm import resolve_model_path
    from .weights.loader import read_config

    for path in models.values():  # a folder that is not there fails now, not on the first request
        read_config(resolve_model_path(path))
    if args.threads is None and args.device == "cpu":
        # torch's worker threads spin between ops; on every core they starve the handler threads
        # that stream the tokens out (measured on 2 cores: 32 clients got 2.6x one client's
        # tokens/s with 2 threads, 5x with 1)
        args.threads = max(1, (os.cpu_count() or 2) - 1)
    if args.max_requests < 1:
        raise MoetierError(f"--max-requests must be at least 1, got {args.max_requests}")
    import logging

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def load(name: str, path: str, device_memory):
        """Resident when the pool says it fits; otherwise offloaded within the whole budget."""
        offload_dir = args.offload_dir and (str(Path(args.offload_dir) / _safe_name(name)) if len(models) > 1
                                            else args.offload_dir)
        return open_llm(args, model=path, device_memory=device_memory, offload_dir=offload_dir,
                    host_memory=args.host_memory if device_memory is not None else None)

    server = make_server(models, load, host=args.host, port=args.port, api_key=args.api_key, budget=budget,
                         max_requests=args.max_requests, keep_alive=args.keep_alive, log_level=args.log_level)
    server.pool.cascades = cascades  # read by the app's generation endpoints (moetier/cascade_serve.py)
    from .cascade_cli import serve_memory_split

    plan = serve_memory_split(cascades, models, budget)
    if plan is not None:  # the budget divided between the cascade's models by their traffic
        server.pool.split = dict(zip(plan.names, plan.device_memory))
        logging.getLogger("moetier.serve").info("%s", plan.explain())
    serve(server)
    return 0
