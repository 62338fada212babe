"""``moetier cascade calibrate | eval``: pick a cascade's thresholds on a task, and score a cascade.

    moetier cascade calibrate --models demo-small,demo --max-accuracy-drop 0.01 --out cascade.json
    moetier cascade eval --cascade cascade.json            (or --cascade demo-small,demo)

``moetier serve --cascade NAME=cascade.json`` and ``moetier batch --cascade cascade.json`` read
the file ``calibrate`` writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional

from .cascade import DEFAULT_RULE, DEFAULT_THRESHOLD, RULES, Cascade, CascadeError, read_calibration


def parse_spec(spec: str) -> dict:
    """``A,B[,C]`` (models, smallest first, default thresholds) or a calibration file (``*.json``)
    -> ``{"models", "rule", "thresholds"}``."""
    if spec.endswith(".json") or Path(spec).is_file():
        return read_calibration(spec)
    models = [m.strip() for m in spec.split(",") if m.strip()]
    if len(models) < 2:
        raise CascadeError(f"a cascade needs two models or more, smallest first (e.g. demo-small,demo), got {spec!r}")
    return {"models": models, "rule": DEFAULT_RULE, "thresholds": [DEFAULT_THRESHOLD] * (len(models) - 1)}


def serve_cascades(values: list[str], models: dict[str, str]) -> dict[str, dict]:
    """``moetier serve --cascade NAME=SPEC`` values as {NAME: {"name", "models", "rule", "thresholds"}};
    each cascade model that is not a ``--model`` id is added to ``models`` under its own name."""
    out: dict[str, dict] = {}
    for v in values:
        name, sep, spec = v.partition("=")
        if not (sep and name and spec):
            raise CascadeError(f"--cascade takes NAME=A,B or NAME=FILE, got {v!r}")
        if name in models or name in out:
            raise CascadeError(f"--cascade: the id {name!r} is already taken")
        data = parse_spec(spec)
        if name in data["models"]:
            raise CascadeError(f"--cascade: {name!r} names the cascade and one of its models; pick another name")
        for m in data["models"]:
            if m in out:
                raise CascadeError(f"--cascade: {m!r} is a cascade, not a model")
            models.setdefault(m, m)
        out[name] = {"name": name, "models": list(data["models"]), "rule": data["rule"],
                     "thresholds": list(data["thresholds"]), "spec": data}
    return out


def serve_memory_split(cascades: dict[str, dict], models: dict[str, str], budget: Optional[int]):
    """The memory plan (:func:`moetier.cascade_memory.plan_for`) of the one cascade whose models are all the
    server serves, within ``budget``; None when there is no budget, no cascade, or other models share it."""
    if budget is None or len(cascades) != 1:
        return None
    (c,) = cascades.values()
    if set(models) != set(c["models"]) or any(models[m] != m for m in c["models"]):
        return None
    from .cascade_memory import plan_for

    return plan_for(c["spec"], budget)


def open_cascade(spec: str, device_memory=None, **llm_options) -> Cascade:
    """The cascade ``spec`` (see :func:`parse_spec`) names, its models loaded with ``llm_options``.

    ``device_memory`` (bytes, or a size such as ``"20MiB"``): the cascade's whole budget, divided
    between its models by :func:`moetier.cascade_memory.plan_for` (``cascade.memory_plan`` says how)."""
    data = parse_spec(spec)
    if device_memory is None:
        return Cascade(data["models"], data["thresholds"], data["rule"], names=data["models"], **llm_options)
    from .cascade_memory import plan_for
    from .llm import LLM
    from .units import parse_size

    from .ram import resolve_budget

    plan = plan_for(data, parse_size(resolve_budget(device_memory, llm_options.get("device", "cpu"))))
    models: list = []
    try:
        for m, dm in zip(data["models"], plan.device_memory):
            opts = dict(llm_options)
            if opts.get("offload_dir"):  # each model's packed copy and traces in a folder of its own
                opts["offload_dir"] = str(Path(opts["offload_dir"]) / "".join(c if c.isalnum() or c in "-_." else "_"
                                                                              for c in m))
            models.append(LLM(m, device_memory=dm, **opts))
    except BaseException:
        for llm in models:
            llm.close()
        raise
    cascade = Cascade(models, data["thresholds"], data["rule"], names=data["models"], own_models=True)
    cascade.memory_plan = plan
    return cascade


def _options(args) -> dict:
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise CascadeError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return {"device": args.device, "dtype": args.dtype}


def _items(args):
    from .evaluate import load_task

    if args.task is None:
        from .demo import task_path

        args.task = str(task_path("addition"))
    return load_task(args.task, args.limit)


def cmd_calibrate(args) -> int:
    from .cascade_calibrate import calibrate, score_model, write_calibration
    from .llm import LLM

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if len(models) < 2:
        raise CascadeError(f"--models needs two models or more, smallest first, got {args.models!r}")
    items = _items(args)
    options = _options(args)
    scores = []
    for name in models:
        llm = LLM(name, **options)
        try:
            scores.append(score_model(llm, name, items, mode=args.mode, use_tqdm=not args.quiet))
        finally:
            llm.close()
    data = calibrate(scores, args.max_accuracy_drop, args.rule, args.holdout, task=args.task)
    write_calibration(data, args.out)
    cal = data["calibration"]
    summary = {"out": args.out, "rule": data["rule"], "thresholds": data["thresholds"],
               "accuracy_alone": cal["accuracy_alone"], "cascade_accuracy": cal["accuracy"],
               "answered_share": cal["answered_share"], "cost_vs_last": cal["cost_vs_last"],
               "rule_auc": {m: {r: s["auc"] for r, s in rules.items()} for m, rules in data["rules"].items()}}
    if "held_out" in data:
        h = data["held_out"]
        summary["held_out"] = {"items": h["items"], "accuracy_alone": h["accuracy_alone"],
                               "cascade_accuracy": h["accuracy"], "answered_share": h["answered_share"]}
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args) -> int:
    from .cascade_calibrate import task_params

    items = _items(args)
    cascade = open_cascade(args.cascade, **_options(args))
    try:
        params = [dataclasses.replace(p, logprobs=None) for p in task_params(cascade.models[-1], items)]
        t = time.perf_counter()
        outs = cascade.generate([it.prompt for it in items], params, use_tqdm=not args.quiet, mode=args.mode)
        seconds = time.perf_counter() - t
    finally:
        cascade.close()
    correct = sum(o.outputs[0].text.strip() == it.answer for o, it in zip(outs, items))
    shares = {n: sum(o.model == n for o in outs) / len(outs) for n in cascade.names}
    print(json.dumps({"cascade": cascade.names, "rule": cascade.rule, "thresholds": cascade.thresholds,
                      "task": args.task, "items": len(items), "correct": correct, "accuracy": correct / len(items),
                      "answered_share": shares, "seconds": round(seconds, 3)}))
    return 0


def add_parser(sub) -> None:
    """Register ``moetier cascade`` on the top-level subparsers."""
    p = sub.add_parser("cascade", help="confidence cascades across model sizes: calibrate thresholds, score one",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    cmds = p.add_subparsers(dest="cascade_command", metavar="calibrate|eval")

    def common(q):
        q.add_argument("--task", default=None, metavar="FILE",
                       help='JSONL of {"prompt", "answer"} (default: the packaged held-out addition task)')
        q.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N task items")
        q.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
        q.add_argument("--dtype", default=None, help="weight and activation dtype (default: each checkpoint's own)")
        q.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: torch's choice)")
        q.add_argument("--mode", default="auto", choices=["auto", "latency", "throughput"],
                       help="how each model runs its requests (as LLM.generate; default: auto)")
        q.add_argument("--quiet", action="store_true", help="no progress bar")

    c = cmds.add_parser(
        "calibrate", help="pick thresholds that keep task accuracy within a drop of the largest model, at least cost",
        description="Run every model on every task item, then pick the thresholds whose cascade accuracy is "
                    "at least the last model's alone minus --max-accuracy-drop at the least time per request, "
                    "and write them (with each rule's separation of right from wrong answers) to --out.")
    c.add_argument("--models", required=True, metavar="A,B[,...]", help="the cascade's models, smallest first")
    c.add_argument("--max-accuracy-drop", type=float, default=0.01, metavar="D",
                   help="accuracy the cascade may lose against the last model alone (default: 0.01)")
    c.add_argument("--rule", default=None, choices=RULES, help=f"confidence rule (default: {DEFAULT_RULE})")
    c.add_argument("--holdout", type=float, default=0.0, metavar="F",
                   help="hold this share of the items out of the calibration and report the cascade on them")
    c.add_argument("--out", default="cascade.json", metavar="FILE", help="calibration file (default: cascade.json)")
    common(c)
    c.set_defaults(func=cmd_calibrate)

    e = cmds.add_parser("eval", help="score a cascade by exact match on a task, with each model's share",
                        description="Run the cascade on the task; print accuracy and the share each model answered.")
    e.add_argument("--cascade", required=True, metavar="A,B|FILE",
                   help="models smallest first (default rule and thresholds), or a calibration file")
    common(e)
    e.set_defaults(func=cmd_eval)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
