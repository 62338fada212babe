"""``moetier bench`` and ``moetier bench report``: cost, accuracy and performance on a workload."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_args import add_model_args, set_threads


BENCH_DESCRIPTION = """\
Run a workload through moetier (or, with --system transformers, through Hugging Face
transformers) and write DIR/result.json: per phase (prefill, decode) TTFT, TPOT p50/p90/p99,
tokens/s, the sparsity-aware utilizations S-MBU and S-MFU (docs/metrics.md) and the
experts activated per step; the cost per million output tokens and its energy; the
exact-match accuracy on a task. Then draw several results on one chart:

  moetier bench --model demo --batch 4 --out runs/moetier-demo
  moetier bench --model demo --batch 4 --system transformers --out runs/hf-demo
  moetier bench report runs/moetier-demo runs/hf-demo --out report   (radar.png, utilization.png, report.md)"""


def cmd_bench(args) -> int:
    from .bench.report import markdown_table
    from .bench.run import BenchConfig, run_bench

    if args.model is None and args.cascade is None:
        args.parser.error("the following arguments are required: --model (or --cascade, or: moetier bench report DIR ...)")
    set_threads(args)
    memory = {k: v for k, v in (("device_memory", args.device_memory), ("host_memory", args.host_memory),
                                ("offload_dir", args.offload_dir)) if v is not None}
    if memory:
        memory.update(cache_policy=args.cache_policy, prefetch=args.prefetch)
    if args.max_model_len is not None:
        memory["max_model_len"] = args.max_model_len
    if args.verify != "first-read":
        memory["verify"] = args.verify
    cfg = BenchConfig(
        model=args.model or args.cascade, cascade=args.cascade,
        out=Path(args.out or (f"bench-results/cascade-{Path(args.cascade).name.replace(',', '-')}" if args.cascade
                              else f"bench-results/{args.system}-{Path(args.model).name}")),
        system=args.system, workload=args.workload, input_len=args.input_len, output_len=args.output_len,
        batch=args.batch, concurrency=args.concurrency, num_prompts=args.num_prompts, hardware=args.hardware,
        usd_per_hour=args.price_per_hour, watts=args.watts, task=args.task, task_limit=args.task_limit,
        device=args.device, dtype=args.dtype, llm_options=memory, progress=not args.quiet)
    result = run_bench(cfg)
    print(markdown_table([result]))
    if args.stats:
        print(f"[stats] {result['expert_cache'] or 'all experts resident'}", file=sys.stderr)
    print(f"[bench] wrote {cfg.out / 'result.json'}", file=sys.stderr)
    return 0


def cmd_bench_report(args) -> int:
    from .bench.report import write_report

    print(write_report([Path(d) for d in args.dirs], Path(args.out)))
    print(f"[bench] wrote radar.png, utilization.png and report.md in {args.out}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    from .bench.hardware import NAMES

    p = sub.add_parser("bench", help="measure cost, accuracy and performance (S-MBU, S-MFU) on a workload",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=BENCH_DESCRIPTION)
    add_model_args(p, required=False)
    g = p.add_argument_group("workload")
    g.add_argument("--workload", default="fixed", metavar="fixed|task|FILE",
                   help='"fixed": --num-prompts prompts of --input-len random token ids (default); "task": the '
                        "--task prompts, each up to its answer's length + 2 tokens, ending at end-of-sequence; or "
                        'a JSONL file, one {"prompt": ..., "max_tokens": N (optional)} per line')
    g.add_argument("--cascade", default=None, metavar="A,B|FILE",
                   help="instead of --model, a confidence cascade (models smallest first, or a moetier cascade "
                        "calibrate file): also reports the share each model answered (best with --workload task)")
    g.add_argument("--input-len", type=int, default=64, metavar="N", help="fixed prompt length in tokens (default: 64)")
    g.add_argument("--output-len", type=int, default=32, metavar="N",
                   help="tokens each request generates, end-of-sequence ignored (default: 32)")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--batch", type=int, default=None, metavar="B",
                   help="run the requests in waves of B, each wave to its end (default: 1)")
    m.add_argument("--concurrency", type=int, default=None, metavar="C",
                   help="keep C requests in flight, a new one starting as one finishes (moetier only)")
    g.add_argument("--num-prompts", type=int, default=None, metavar="N",
                   help="requests of the fixed workload (default: B, or 4 x C)")
    g = p.add_argument_group("measurement")
    g.add_argument("--system", default="moetier", choices=["moetier", "transformers"],
                   help="run the workload through moetier's engine or transformers' generate (default: moetier)")
    g.add_argument("--hardware", default="local", metavar="NAME",
                   help=f"peaks, price and power to measure against: {', '.join(NAMES)} "
                        "(default: local, its peaks measured now)")
    g.add_argument("--price-per-hour", type=float, default=None, metavar="USD", help="override the hardware's price")
    g.add_argument("--watts", type=float, default=None, metavar="W", help="override the hardware's power")
    g.add_argument("--task", default=None, metavar="FILE",
                   help="exact-match task, JSONL of {\"prompt\", \"answer\"} (default: the demo's addition task)")
    g.add_argument("--task-limit", type=int, default=None, metavar="N", help="score only the first N task items")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="where result.json goes (default: bench-results/SYSTEM-MODEL)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench, parser=p)
    reports = p.add_subparsers(dest="bench_command", metavar="report", title="or compare runs")
    r = reports.add_parser(
        "report", help="draw results side by side: radar.png, utilization.png, report.md",
        description="Read DIR/result.json of each run and write, in --out: radar.png (accuracy, cost and "
                    "performance axes, each scaled so that better is outward; one chart per model and "
                    "workload), utilization.png (S-MBU and S-MFU per phase) and report.md (the table, "
                    "also printed).")
    r.add_argument("dirs", nargs="+", metavar="DIR", help="a folder holding a result.json")
    r.add_argument("--out", default="bench-report", metavar="DIR", help="where the report goes (default: bench-report)")
    r.set_defaults(func=cmd_bench_report)
