"""``moetier bench``: run a workload through one system and write ``result.json``.

Everything that can be checked without the model (options, hardware name, workload file,
task file) is checked first. Then the system loads the model, warms up on a short
request, runs the workload timing each step, scores the task, and the metrics are
computed against the hardware (``local``: measured after the run, on the idle machine).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..errors import BenchError
from ..evaluate import evaluate, load_task
from ..llm import resolve_model_path
from ..weights.loader import load_args, parse_dtype
from . import hardware, workload
from .shape import ModelShape
from .summary import summarize

SYSTEMS = ("moetier", "transformers")
RESULT_VERSION = 1


@dataclass
class BenchConfig:
    """One benchmark run, as the command line gives it."""

    model: str
    out: Path
    system: str = "moetier"
    workload: str = "fixed"  # or a JSONL file of prompts
    input_len: int = 64
    output_len: int = 32
    batch: Optional[int] = None  # waves of this many requests (default 1) ...
    concurrency: Optional[int] = None  # ... or this many in flight, refilled as each finishes
    num_prompts: Optional[int] = None  # fixed workload: default the batch, or 4 x the concurrency
    hardware: str = "local"
    usd_per_hour: Optional[float] = None
    watts: Optional[float] = None
    task: Optional[str] = None  # exact-match task; default the demo's shipped one
    task_limit: Optional[int] = None
    device: str = "cpu"
    dtype: Optional[str] = None
    llm_options: dict = field(default_factory=dict)  # moetier's LLM(...) memory options (offloading)
    progress: bool = True
    cascade: Optional[str] = None  # "A,B" or a calibration file: run this cascade (moetier/bench/cascade_run.py)

    @property
    def slots(self) -> int:
        return self.concurrency or self.batch or 1

    def check(self) -> None:
        """Reject bad options before anything loads."""
        if self.system not in SYSTEMS:
            raise BenchError(f"unknown system {self.system!r}; choose {' or '.join(SYSTEMS)}")
        if self.batch is not None and self.concurrency is not None:
            raise BenchError("give --batch or --concurrency, not both")
        for name in ("input_len", "output_len", "batch", "concurrency", "num_prompts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise BenchError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.system == "transformers" and self.workload == "task":
            raise BenchError("--workload task needs --system moetier (requests that end at end-of-sequence)")
        if self.system == "transformers":
            if self.concurrency is not None:
                raise BenchError("--concurrency needs --system moetier (transformers' generate runs static "
                                 "batches: use --batch)")
            if self.llm_options:
                flags = ", ".join("--" + k.replace("_", "-") for k in self.llm_options)
                raise BenchError(f"{flags}: moetier options; --system transformers keeps the whole model in memory")
        hardware.check_name(self.hardware)


def run_bench(cfg: BenchConfig) -> dict:
    """Run the benchmark ``cfg`` describes, write ``cfg.out/result.json`` and return its content."""
    cfg.check()
    if cfg.cascade is not None:
        from .cascade_run import run_cascade_bench

        return run_cascade_bench(cfg, RESULT_VERSION)
    path = resolve_model_path(cfg.model)
    family, args, _ = load_args(path)  # a bad model folder fails here
    texts = None if cfg.workload in ("fixed", "task") else workload.read_file(cfg.workload, cfg.output_len)
    task_file = cfg.task or str(_demo_task())
    items = load_task(task_file, cfg.task_limit)
    system = _load(cfg, path)
    try:
        if cfg.workload == "task":  # the task's prompts, each ending at end-of-sequence
            from .cascade_run import task_workload

            requests = task_workload(items, system.tokenizer)
        elif texts is None:
            count = cfg.num_prompts or (4 * cfg.concurrency if cfg.concurrency else cfg.slots)
            requests = workload.fixed(args.vocab_size, cfg.input_len, cfg.output_len, count)
        else:
            requests = workload.encode(texts, system.tokenizer)
        system.run([workload.Request(requests[0].prompt_ids[:8], 2)], 1, False, tqdm(disable=True))  # warm-up
        bar = tqdm(total=len(requests), desc=f"bench {system.name}", unit="req", disable=not cfg.progress)
        try:
            record = system.run(requests, cfg.slots, cfg.concurrency is not None, bar)
        finally:
            bar.close()
        accuracy = _accuracy(system, items, task_file)
        expert_cache = system.stats()
        quantization = system.quantization
        hw = hardware.resolve(cfg.hardware, system.dtype, system.device, cfg.usd_per_hour, cfg.watts)
    finally:
        system.close()
    shape = ModelShape.of_args(family, args, system.dtype)
    result = {
        "version": RESULT_VERSION,
        "system": system.name,
        "model": cfg.model,
        "model_type": args.model_type,
        "device": str(system.device),
        "dtype": str(system.dtype).removeprefix("torch."),
        "quantization": quantization,  # "none": the weights are in dtype
        "threads": torch.get_num_threads(),
        "workload": {**workload.describe(requests, cfg.workload),
                     **({"concurrency": cfg.concurrency} if cfg.concurrency else {"batch": cfg.slots})},
        "hardware": asdict(hw),
        "model_shape": asdict(shape),
        **summarize(record, shape, hw),
        "accuracy": accuracy,
        "expert_cache": expert_cache,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    from .cascade_run import per_request

    result["cost"].update(per_request(hw, record.seconds, len(requests)))  # comparable with a cascade's
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _demo_task() -> Path:
    from ..demo import task_path

    return task_path("addition")


def _load(cfg: BenchConfig, path: Path):
    if cfg.system == "transformers":
        from .system_transformers import TransformersSystem

        return TransformersSystem(path, cfg.device, parse_dtype(cfg.dtype))
    from .system_moetier import MoetierSystem

    return MoetierSystem(cfg.model, cfg.device, cfg.dtype, cfg.slots, **cfg.llm_options)


def _accuracy(system, items, task_file: str) -> dict:
    """Exact match on the task (accuracy None, with the reason, when the model has no tokenizer)."""
    if system.tokenizer is None:
        return {"task": task_file, "accuracy": None, "note": "the model has no tokenizer"}
    result = evaluate(system.generator, items, use_tqdm=False)
    result.pop("completions")
    return {"task": task_file, **result}
