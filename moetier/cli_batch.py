"""``moetier batch``: an OpenAI Batch API file (JSONL) run offline, in throughput mode."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_args import add_model_args, llm_options, open_llm, print_stats, set_threads
from .errors import MoetierError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "batch", help="run an OpenAI Batch API file (JSONL) offline, in throughput mode",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every request of --input, an OpenAI Batch API file (one\n"
                    '{"custom_id", "method": "POST", "url": "/v1/chat/completions" or "/v1/completions", "body"}\n'
                    "per line), in big planned passes, appending one result line per request to --output as\n"
                    "it finishes. Re-running with the same --output skips the custom_ids already there, so an\n"
                    "interrupted job resumes where it stopped. A malformed line gets an error entry.")
    add_model_args(p, required=False)
    p.add_argument("--cascade", default=None, metavar="A,B|FILE",
                   help="instead of --model, a confidence cascade: the whole file through A in throughput mode, "
                        "then the requests A is unsure of through B (FILE: a moetier cascade calibrate file); "
                        "each result's model names the model that answered, bodies may name the cascade "
                        "as --model NAME (default: the A,B list)")
    p.add_argument("--input", required=True, metavar="FILE", help="requests, JSONL")
    p.add_argument("--output", required=True, metavar="FILE", help="results, JSONL (appended to; resumed from)")
    p.add_argument("--explain", action="store_true",
                   help="print the throughput plan (batch sizes, memory split, predicted tokens/s) and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--retry-errors", action="store_true",
                   help="run again the lines whose last result in --output was an error")
    from .cluster.cli import add_batch_args

    add_batch_args(p)
    p.set_defaults(func=cmd_batch)


def cmd_batch(args) -> int:
    from .batch_file import run_batch

    if not Path(args.input).exists():  # before the model loads
        raise FileNotFoundError(f"{args.input}: no such input file")
    if args.cascade is None and args.model is None:
        raise MoetierError("moetier batch needs --model (or --cascade)")
    if args.ray is not None:  # on a Ray cluster (moetier/cluster)
        from .cluster.cli import cmd_batch_ray

        return cmd_batch_ray(args, llm_options(args))
    if args.cascade is not None:
        from .cascade_cli import open_cascade

        set_threads(args)
        llm = open_cascade(args.cascade, device_memory=args.device_memory or args.host_memory, device=args.device,
                           dtype=args.dtype, max_model_len=args.max_model_len, offload_dir=args.offload_dir)
        args.model = args.model or args.cascade
    else:
        llm = open_llm(args)
    try:
        summary = run_batch(llm, args.input, args.output, model=args.model, explain=args.explain,
                            use_tqdm=not args.quiet, retry_errors=args.retry_errors)
    finally:
        llm.close()
    if args.explain:
        print(summary.pop("plan"))
    elif summary.get("run"):
        r = summary["run"]
        print(f"[batch] {summary['written']} results appended to {args.output} ({summary['errors']} errors, "
              f"{summary['already_done']} already there); {r['generated_tokens']} tokens in {r['seconds']:.1f} s: "
              f"{r['measured_tok_s']:.1f} tok/s measured, {r['predicted_tok_s']:.1f} predicted", file=sys.stderr)
    print(json.dumps(summary if not args.quiet else {k: v for k, v in summary.items() if k != "run"}))
    print_stats(llm, args)
    if "checkpoint_error" in summary:  # its requests have error lines; a rerun once repaired runs them
        print(f"moetier: error: the run stopped on a damaged checkpoint: {summary['checkpoint_error']}",
              file=sys.stderr)
        return 1
    return 0
