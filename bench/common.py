"""Helpers shared by the benchmark scripts: synthetic checkpoints, timing, bandwidth."""

from __future__ import annotations

import json
import mmap
import os
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


def spawn_worker(script: str, spec: dict, timeout: float, tags: tuple[str, ...] = (),
                 echo_stderr: bool = False, ram_limit: int | None = None) -> list[dict]:
    """Run ``script --worker SPEC_FILE`` in a fresh process (its peak RSS is its own): its JSON lines,
    or one error object carrying ``spec``'s ``kind`` and ``tags``. ``echo_stderr``: pass the tail of
    a successful worker's stderr on (a plan's explanation). ``ram_limit``: run it in a memory cgroup
    of that many bytes (bench/cgroup.py; page cache counted, no swap); every row then carries the
    group's ``peak_mib``, ``oom_killed``, ``limit_hits`` and ``reached_limit``."""
    import subprocess
    import sys
    import tempfile

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    error = {"what": spec["kind"], **{k: spec.get(k) for k in tags}}
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="spec-") as f:
        json.dump(spec, f)  # a file: a spec with thousands of prompts is too long for a command line
        f.flush()
        cmd = [sys.executable, script, "--worker", f.name]
        limited = None
        if ram_limit is not None:
            from cgroup import run_limited

            limited = run_limited(cmd, ram_limit, timeout=timeout, env=env)
            if limited.timed_out:
                return [{**error, "error": f"timed out after {timeout:.0f}s"}]
            p = subprocess.CompletedProcess(cmd, limited.returncode, limited.stdout, limited.stderr)
        else:
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            except subprocess.TimeoutExpired:
                return [{**error, "error": f"timed out after {timeout:.0f}s"}]
    rows = []
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    if p.returncode != 0 or not rows:
        why = "OOM-killed" if limited is not None and limited.oom_killed else f"exit {p.returncode}"
        rows.append({**error, "error": why, "stderr_tail": p.stderr[-2000:]})
    elif echo_stderr:
        sys.stderr.write(p.stderr[-3000:])
    if limited is not None:
        for row in rows:
            row.update({"ram_limit_mib": round(ram_limit / 2**20, 1), "oom_killed": limited.oom_killed,
                        "peak_mib": None if limited.peak_bytes is None else round(limited.peak_bytes / 2**20, 1),
                        "limit_hits": limited.limit_hits, "reached_limit": limited.reached_limit})
    return rows


def drop_file_cache(files, sync: bool = True) -> None:
    """Drop these files' clean pages from the page cache (sync first so they are clean), so the
    next read really comes from the disk."""
    if sync:
        os.sync()
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def mixtral_config(a, **extra) -> dict:
    """A synthetic Mixtral config from a benchmark's size flags."""
    return dict(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, num_local_experts=a.experts,
                num_experts_per_tok=a.top_k, vocab_size=a.vocab, max_position_embeddings=4096,
                tie_word_embeddings=False, **extra)


def raw_read(files, direct: bool = True, limit: int | None = None) -> int:
    """dd-like: sequential reads into one page-aligned 16 MiB buffer (O_DIRECT needs the alignment),
    stopping after ``limit`` bytes if given; returns the bytes read."""
    buf = mmap.mmap(-1, 16 << 20)
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
    total = 0
    for f in files:
        fd = os.open(f, flags)
        try:
            off = 0
            while limit is None or total < limit:
                n = os.preadv(fd, [buf], off)
                if n <= 0:
                    break
                off += n
                total += n
        finally:
            os.close(fd)
        if limit is not None and total >= limit:
            break
    return total
