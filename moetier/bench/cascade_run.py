"""``moetier bench --cascade A,B|FILE``: a cascade run like a model, written as result.json.

The workload's requests go to the first model, through the same timed step loop as a single
model (:class:`~moetier.bench.system_moetier.MoetierSystem`), with the log-probabilities its
confidence rule needs; those below its threshold go on to the next model, run the same way,
and so on. Each model's steps are summarized against its own shape (S-MBU, S-MFU, activated
experts: ``cascade.per_model``); the run as a whole has:

* ``end_to_end``: the wall time of all the models' runs, and the output tokens delivered (those
  of the answers kept; the tokens of answers that were escalated are paid for, not delivered);
* ``cost``: per million delivered tokens and per request, from the same hardware price and power;
* ``prefill.ttft_s`` / ``decode.tpot_s``: per request, from its submission to the first model
  to the first token of the model that answered it, and the gaps between that model's tokens;
* ``cascade.answered_share``: the share of the workload's requests each model answered, and
  ``accuracy``: the cascade on the task (``answered_share`` there too).

With ``--workload task`` the task's own prompts are the workload (each up to its answer's length
in tokens + 2, ending at end-of-sequence): confidence is only meaningful on real requests, and
single models benchmarked on the same workload share the cascade's radar chart.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from ..cascade import passes, request_confidence, scoring_params
from ..errors import BenchError
from ..evaluate import load_task
from ..outputs import RequestOutput
from ..runtime.sampling import SamplingParams
from ..weights.loader import load_args
from . import hardware, workload
from .metrics import kwh_per_million, percentiles, usd_per_million
from .record import RunRecord
from .shape import ModelShape
from .summary import summarize


def task_workload(items, tokenizer) -> list[workload.Request]:
    """The task's prompts as requests that stop at end-of-sequence, each allowed its answer's length + 2."""
    return [workload.Request(tokenizer.encode(it.prompt), len(tokenizer.encode(it.answer, add_special_tokens=False)) + 2,
                             eos=True) for it in items]


def run_cascade_bench(cfg, result_version: int) -> dict:
    """The cascade ``cfg.cascade`` names, through ``cfg``'s workload; writes ``cfg.out/result.json``."""
    from ..cascade_cli import open_cascade, parse_spec
    from ..llm import resolve_model_path
    from .run import _accuracy, _demo_task
    from .system_moetier import MoetierSystem, quantization_of

    if cfg.system != "moetier":
        raise BenchError("--cascade runs on moetier's engine (--system moetier)")
    spec = parse_spec(cfg.cascade)
    shapes_args = [load_args(resolve_model_path(m)) for m in spec["models"]]  # a bad model fails here
    task_file = cfg.task or str(_demo_task())
    items = load_task(task_file, cfg.task_limit)
    cascade = open_cascade(cfg.cascade, device=cfg.device, dtype=cfg.dtype, max_num_seqs=max(cfg.slots, 64),
                           **cfg.llm_options)
    try:
        systems = [MoetierSystem.wrap(llm) for llm in cascade.models]
        if cfg.workload == "task":
            requests = task_workload(items, cascade.tokenizer)
        elif cfg.workload == "fixed":
            count = cfg.num_prompts or (4 * cfg.concurrency if cfg.concurrency else cfg.slots)
            requests = workload.fixed(shapes_args[0][1].vocab_size, cfg.input_len, cfg.output_len, count)
        else:
            requests = workload.encode(workload.read_file(cfg.workload, cfg.output_len), cascade.tokenizer)
        for s in systems:  # warm-up
            s.run([workload.Request(requests[0].prompt_ids[:8], 2)], 1, False, tqdm(disable=True))
        bar = tqdm(total=len(requests), desc="bench cascade", unit="req", disable=not cfg.progress)
        try:
            levels = _run_levels(systems, spec, requests, cfg, bar)
        finally:
            bar.close()
        cascade.answered = [0] * len(cascade.models)
        accuracy = _accuracy(SimpleNamespace(tokenizer=cascade.tokenizer, generator=cascade), items, task_file)
        accuracy["answered_share"] = cascade.shares()
        hw = hardware.resolve(cfg.hardware, systems[0].dtype, systems[0].device, cfg.usd_per_hour, cfg.watts)
        quant = {n: quantization_of(llm) for n, llm in zip(spec["models"], cascade.models)}
        stats = {n: s.stats() for n, s in zip(spec["models"], systems)}
    finally:
        cascade.close()
    result = _result(cfg, spec, requests, levels, shapes_args, hw, systems[0], result_version)
    result.update(accuracy=accuracy, quantization=quant if any(v != "none" for v in quant.values()) else "none",
                  expert_cache={n: s for n, s in stats.items() if s})
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _run_levels(systems, spec, requests, cfg, bar) -> list[dict]:
    """Each model's timed run over the requests that reach it; who answered, and when."""
    pending = list(range(len(requests)))
    submitted: dict[int, float] = {}
    levels = []
    for level, system in enumerate(systems):
        if not pending:
            break
        last = level == len(systems) - 1
        params = None if last else scoring_params(SamplingParams(), spec["rule"]).logprobs
        times: dict[str, list[float]] = {}
        record = system.run([requests[i] for i in pending], cfg.slots, cfg.concurrency is not None,
                            tqdm(disable=True), logprobs=params, token_times=times)
        for j, i in enumerate(pending):
            submitted.setdefault(i, system.submitted[str(j)])
        answered, escalated = [], []
        for j, i in enumerate(pending):
            out = RequestOutput(str(j), None, requests[i].prompt_ids, system.outputs[str(j)])
            conf = None if last else request_confidence(out, spec["rule"])
            if last or passes(conf, spec["thresholds"][level]):
                ts = times.get(str(j), [])
                answered.append({"index": i, "tokens": len(ts), "ttft": ts[0] - submitted[i] if ts else None,
                                 "itl": [b - a for a, b in zip(ts, ts[1:])]})
            else:
                escalated.append(i)
        bar.update(len(answered))
        levels.append({"name": spec["models"][level], "record": record, "requests": len(pending),
                       "answered": answered})
        pending = escalated
    return levels


def _result(cfg, spec, requests, levels, shapes_args, hw, first, version: int) -> dict:
    n = len(requests)
    seconds = sum(lv["record"].seconds for lv in levels)
    answers = [a for lv in levels for a in lv["answered"]]
    delivered = sum(a["tokens"] for a in answers)
    ttft = [a["ttft"] for a in answers if a["ttft"] is not None]
    itl = [g for a in answers for g in a["itl"]]
    models = {}
    for lv, (family, args, _) in zip(levels, shapes_args):
        shape = ModelShape.of_args(family, args, first.dtype)
        models[lv["name"]] = {"requests": lv["requests"], "answered": len(lv["answered"]),
                              "model_shape": asdict(shape), **summarize(lv["record"], shape, hw)}
    return {
        "version": version, "system": "moetier-cascade", "model": ",".join(spec["models"]),
        "model_type": "cascade", "device": str(first.device), "dtype": str(first.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "workload": {**workload.describe(requests, cfg.workload),
                     **({"concurrency": cfg.concurrency} if cfg.concurrency else {"batch": cfg.slots})},
        "hardware": asdict(hw),
        "cascade": {"models": spec["models"], "rule": spec["rule"], "thresholds": spec["thresholds"],
                    "answered_share": {name: sum(len(lv["answered"]) for lv in levels if lv["name"] == name) / n
                                       for name in spec["models"]},
                    "per_model": models},
        "prefill": {"ttft_s": percentiles(ttft)} if ttft else None,
        "decode": {"tpot_s": percentiles(itl)} if itl else None,
        "end_to_end": {"seconds": seconds, "output_tokens": delivered,
                       "throughput_tok_s": delivered / seconds if seconds else 0.0},
        "cost": {
            "usd_per_1m_output_tokens": usd_per_million(hw.usd_per_hour, seconds, max(1, delivered)),
            "kwh_per_1m_output_tokens": kwh_per_million(hw.watts, seconds, max(1, delivered)),
            **per_request(hw, seconds, n),
            "usd_per_hour": hw.usd_per_hour, "watts": hw.watts,
            "note": "every model's run time at the hardware's price and power, over the tokens delivered "
                    "(escalated answers' tokens are paid, not delivered) and over the requests",
        },
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }


def per_request(hw, seconds: float, requests: int) -> dict:
    """Price and energy per request: the run's wall time at the hardware's price and power, over its requests."""
    return {"usd_per_request": hw.usd_per_hour * seconds / 3600 / requests,
            "joules_per_request": hw.watts * seconds / requests}


def cascade_group(results: list[dict]) -> dict[str, str]:
    """For ``moetier bench report``: each single model that is part of a cascade among ``results``
    (same workload) -> that cascade's model string, so that they share its radar chart."""
    out: dict[str, str] = {}
    for r in results:
        if r.get("cascade"):
            for m in r["cascade"]["models"]:
                out[Path(m).name] = r["model"]
    return out
