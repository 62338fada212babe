"""Helpers shared by the benchmark scripts: synthetic checkpoints, timing, bandwidth."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch


def synthetic_checkpoint(folder: Path, model_type: str, config: dict, dtype=torch.bfloat16) -> Path:
    """Write a random-weight checkpoint in the hub layout once; reuse it on later runs."""
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **config)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Host memory bandwidth in bytes/s, counting the read and the write of a large copy."""
    a = torch.ones(nbytes, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)
