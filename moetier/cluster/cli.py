"""The command line's Ray options: ``moetier batch --ray`` (and ``moetier serve --ray``)."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import MoetierError


def _add_ray_arg(g) -> None:
    g.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS|auto|local",
                   help="run on a Ray cluster: the head's HOST:PORT (what `ray start --head` prints), auto (the "
                        "cluster this machine is part of, or $RAY_ADDRESS; the default with a bare --ray), or "
                        "local (a cluster of this machine alone, on 127.0.0.1)")


def add_batch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray cluster", "Spread the file over engine replicas (Ray actors named MoetierReplica), "
                             "each loading --model with the model and memory options above on its node; the "
                             "model folder must be at the same path on every node.")
    _add_ray_arg(g)
    g.add_argument("--replicas", default="auto", metavar="N|auto",
                   help="engine replicas (default: auto, one per live node)")
    g.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="requests handed to a replica at a time (default: two chunks per replica; the whole "
                        "job with one replica)")
    g.add_argument("--max-restarts", type=int, default=3, metavar="N",
                   help="replacement replicas started per replica for those that die (default: 3)")


def cmd_batch_ray(args, options: dict) -> int:
    from .batch import run_batch_ray

    if args.cascade is not None or args.explain:
        raise MoetierError("--ray runs one --model; --cascade and --explain run on this machine only")
    if args.threads is not None and args.threads < 1:
        raise MoetierError(f"--threads must be at least 1, got {args.threads}")
    summary = run_batch_ray(args.input, args.output, options, model=args.model, replicas=args.replicas,
                            address=args.ray, threads=args.threads, chunk_size=args.chunk_size,
                            use_tqdm=not args.quiet, retry_errors=args.retry_errors, max_restarts=args.max_restarts)
    print(f"[batch] {summary['written']} results appended to {args.output} ({summary['errors']} errors, "
          f"{summary['already_done']} already there) by {len(summary['replicas'])} replicas; "
          f"{summary['completion_tokens']} tokens in {summary['seconds']:.1f} s: {summary['tok_s']:.1f} tok/s; "
          f"{summary['retries']} requests retried", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray cluster", "Serve on Ray Serve instead: one deployment per model "
                             "(MoetierModel-ID), its replicas each holding the model, scaled on ongoing "
                             "requests, placed on the nodes that start the model fastest (page cache, local "
                             "disk, network), streams moved to another replica when theirs is drained or "
                             "dies; the HTTP proxy on --host:--port of the head node.")
    _add_ray_arg(g)
    g.add_argument("--replicas", action="append", default=None, metavar="[ID=]MIN:MAX",
                   help="replicas of model ID (no ID: of every model), e.g. 0:2 (none until the first request, "
                        "at most 2); repeatable (default: 1:1)")
    g.add_argument("--load-rates", default=None, metavar="FILE",
                   help="the placement's page-cache and disk rates: bench/load.py's JSON lines (the packed loader "
                        "warm and cold; default: the figures of the development machine)")
    g.add_argument("--network-gbps", type=float, default=None, metavar="GB/S",
                   help="the placement's rate for a node that fetches the model (default 1.25: 10 GbE)")


def cmd_serve_ray(args, models: dict, cascades: dict, options: dict) -> int:
    from .placement import Rates
    from .serve import parse_scales, run

    if cascades:
        raise MoetierError("--ray serves --model deployments; --cascade runs on this machine only")
    scales = parse_scales(args.replicas or [], models)
    run(models, options, scales, address=args.ray, host=args.host, port=args.port, threads=args.threads,
        api_key=args.api_key, max_requests=args.max_requests,
        rates=Rates.measured(args.load_rates, network_gbps=args.network_gbps))
    return 0
