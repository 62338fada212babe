"""The demo cascade on the addition task: accuracy, share escalated, and cost per request of the
small model alone, the large model alone and the cascade, measured in one run. Prints JSON.

    python bench/cascade.py                       # latency mode: the engine batches up to 64 requests a step
    python bench/cascade.py --mode throughput     # one planned throughput run per model

1. Both models answer the 1000 calibration additions (``addition_calibrate.jsonl``); each
   confidence rule gets thresholds from :func:`moetier.cascade_calibrate.pick_thresholds`
   (accuracy within ``--max-accuracy-drop`` of the large model, least cost).
2. On the held-out task (``addition.jsonl``, 200 items none of the calibration ones) every rule's
   separation of the small model's right and wrong answers (ROC AUC, mean confidence gap) and
   its cascade's accuracy are measured.
3. Small alone, large alone and the cascade (default rule, its calibrated threshold) run the
   held-out task ``--rounds`` times, interleaved so that the machine's load falls on all three
   alike; each one's cost per request is its median round's wall time over the requests. Energy
   per request: that time at the CPU's estimated power (``moetier.bench.hardware``: a server
   core's share of its package TDP per thread). Ratios are within this run.

On models this small a call's fixed costs weigh: in throughput mode the planner's probe of the
CPU share left by other work (run per call when the machine is loaded, ~0.25 s on 2 busy cores)
is paid once per model the cascade runs, which is why latency mode is the default here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

from moetier import LLM
from moetier.bench.hardware import CPU_WATTS_PER_THREAD
from moetier.cascade import DEFAULT_RULE, RULES, Cascade
from moetier.cascade_calibrate import pick_thresholds, score_model, separation, simulate, task_params
from moetier.demo import task_path
from moetier.evaluate import load_task


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", default="demo-small")
    ap.add_argument("--large", default="demo")
    ap.add_argument("--mode", default="latency", choices=["throughput", "latency"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--max-accuracy-drop", type=float, default=0.01)
    ap.add_argument("--calibration-items", type=int, default=None, help="default: all 1000")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cal_items = load_task(task_path("addition_calibrate"), args.calibration_items)
    items = load_task(task_path("addition"))
    small, large = LLM(args.small), LLM(args.large)
    names = [args.small, args.large]
    mode = args.mode
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    log(f"scoring both models on {len(cal_items)} calibration items ...")
    cal = [score_model(small, args.small, cal_items, mode=mode), score_model(large, args.large, cal_items, mode=mode)]
    log(f"scoring both models on the {len(items)} held-out items ...")
    held = [score_model(small, args.small, items, mode=mode), score_model(large, args.large, items, mode=mode)]
    rules = {}
    for rule in RULES:
        thresholds, sim_cal = pick_thresholds(cal, rule, args.max_accuracy_drop)
        sim_held = simulate(held, rule, thresholds)
        rules[rule] = {
            "held_out": separation(held[0].correct, held[0].confidence[rule]),
            "calibration": separation(cal[0].correct, cal[0].confidence[rule]),
            "threshold": thresholds[0],
            "cascade_accuracy_calibration": sim_cal["accuracy"], "escalated_calibration": sim_cal["escalated_share"],
            "cascade_accuracy_held_out": sim_held["accuracy"], "escalated_held_out": sim_held["escalated_share"],
        }
    by_auc = sorted(RULES, key=lambda r: -(rules[r]["held_out"]["auc"] or 0))
    threshold = rules[DEFAULT_RULE]["threshold"]

    # timed rounds on the held-out task, interleaved
    params = [dataclasses.replace(p, logprobs=None) for p in task_params(large, items)]  # as moetier eval
    prompts = [it.prompt for it in items]
    cascade = Cascade([small, large], thresholds=[threshold], rule=DEFAULT_RULE, names=names)
    runs = {"small": lambda: small.generate(prompts, params, use_tqdm=False, mode=mode),
            "large": lambda: large.generate(prompts, params, use_tqdm=False, mode=mode),
            "cascade": lambda: cascade.generate(prompts, params, use_tqdm=False, mode=mode)}
    for fn in runs.values():  # warm-up: planner probes, oneDNN primitives
        fn()
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    outs: dict = {}
    for r in range(args.rounds):
        for k, fn in runs.items():
            s, outs[k] = timed(fn)
            seconds[k].append(s)
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items()))
    watts = CPU_WATTS_PER_THREAD * args.threads
    n = len(items)
    table = {}
    for k in runs:
        acc = sum(o.outputs[0].text.strip() == it.answer for o, it in zip(outs[k], items)) / n
        med = statistics.median(seconds[k])
        table[k] = {"accuracy": acc, "ms_per_request": 1e3 * med / n, "joules_per_request": watts * med / n,
                    "seconds_rounds": [round(s, 3) for s in seconds[k]]}
    table["cascade"]["escalated_share"] = sum(o.model == args.large for o in outs["cascade"]) / n
    for k in runs:
        table[k]["cost_vs_large"] = table[k]["ms_per_request"] / table["large"]["ms_per_request"]
    print(json.dumps({
        "models": names, "mode": mode, "threads": args.threads, "rounds": args.rounds,
        "calibration_items": len(cal_items), "held_out_items": n, "max_accuracy_drop": args.max_accuracy_drop,
        "accuracy_alone": {"calibration": {s.name: s.accuracy for s in cal}, "held_out": {s.name: s.accuracy for s in held}},
        "rules": rules, "rules_by_held_out_auc": by_auc, "default_rule": DEFAULT_RULE, "threshold": threshold,
        "watts": watts, "table": table,
        "target": {"accuracy_within_1_point": table["cascade"]["accuracy"] >= table["large"]["accuracy"] - 0.01,
                   "cost_at_most_0.7x": table["cascade"]["cost_vs_large"] <= 0.7},
    }, indent=2))
    small.close()
    large.close()


if __name__ == "__main__":
    main()
