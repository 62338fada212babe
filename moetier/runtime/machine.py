"""This machine's rates, measured by small timed probes and cached per machine.

:class:`MachineProfile` times a matmul, a skinny (weight-streaming) matmul, a memory copy, an
attention call and a small op (well under 2 s on an idle machine) once per machine, thread count
and dtype, and caches them as JSON under ``~/.cache/moetier/machine.json``. The rates that depend
on the model or on where its experts rest (per-token bookkeeping with its tokenizer, expert reads
from its packed file, whose speed also depends on the page cache) are measured per model.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

PROFILE_VERSION = 3  # 2: attention of decoding sequences batched into one call; 3: the wide-matmul path


@dataclass
class MachineProfile:
    """Measured rates of this machine for one dtype (all per second or seconds per call)."""

    matmul_flops: float  # FLOP/s of a large matmul
    stream_bps: float  # weight bytes/s a skinny matmul (a few rows) reads: the decode regime
    copy_bps: float  # bytes/s of a large memory copy, read + write counted
    attn_flops: float  # FLOP/s of a prefill-sized attention call
    attn_call_s: float  # fixed cost of one sequence's attention in one layer (cache write + SDPA)
    op_s: float  # fixed cost of one small torch op
    # bf16 on the CPU: calls of ``wide_rows`` rows or more upcast to float32 (models/prepack.py; 0: never),
    # multiplying at ``wide_flops`` after converting their weight at ``upcast_bps`` (bf16 bytes/s)
    wide_rows: int = 0
    wide_flops: float = 0.0
    upcast_bps: float = 0.0
    threads: int = 1
    measured_at: float = 0.0

    @classmethod
    def measure(cls, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "MachineProfile":
        """Time the probes now on ``device`` (about half a second)."""
        d = torch.device(device)
        with torch.inference_mode():
            return cls(
                matmul_flops=_matmul_rate(dtype, d), stream_bps=_stream_rate(dtype, d), copy_bps=_copy_rate(d),
                attn_flops=_attn_rate(dtype, d), attn_call_s=_attn_call_cost(dtype, d), op_s=_op_cost(d),
                **_wide_rates(dtype, d), threads=torch.get_num_threads(), measured_at=time.time(),
            )

    @classmethod
    def load_or_measure(cls, dtype: torch.dtype, cache_dir: Optional[Path] = None,
                        device: torch.device | str = "cpu") -> "MachineProfile":
        """The cached profile of this machine, device, thread count and dtype; measured and saved if absent."""
        path = (cache_dir or Path.home() / ".cache" / "moetier") / "machine.json"
        d = torch.device(device)
        key = _machine_key(dtype, d)
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = {}
        entry = cached.get(key)
        if isinstance(entry, dict):
            try:
                return cls(**entry)
            except TypeError:
                pass  # an older layout: measure again
        prof = cls.measure(dtype, d)
        cached[key] = asdict(prof)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cached, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home: measure again next time
        return prof


def _machine_key(dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        cpu = f"{cpu}|{torch.cuda.get_device_name(device)}"
    return (f"v{PROFILE_VERSION}|{platform.node()}|{cpu}|cpus={os.cpu_count()}|threads={torch.get_num_threads()}"
            f"|{device.type}|{str(dtype).removeprefix('torch.')}|torch={torch.__version__.split('+')[0]}")


def _timed(fn, repeats: int = 5, device: torch.device = torch.device("cpu")) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    fn()  # warm up (allocations, kernel choice)
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _matmul_rate(dtype, device=torch.device("cpu")) -> float:
    m = 512 if device.type == "cpu" else 4096  # a GPU needs a bigger problem to reach its rate
    x = torch.full((m, 1024), 0.01, dtype=dtype, device=device)
    w = torch.full((2048, 1024), 0.01, dtype=dtype, device=device)
    return 2 * m * 1024 * 2048 / _timed(lambda: F.linear(x, w), device=device)


def _wide_rates(dtype, device=torch.device("cpu")) -> dict:
    """The float32 path of wide bf16 matmuls on the CPU (models/prepack.py): from how many rows,
    its multiply rate, and how fast it converts a (packed, where packing works) weight."""
    from ..models import prepack

    rows = prepack.upcast_rows(torch.get_num_threads()) if dtype == torch.bfloat16 and device.type == "cpu" else 0
    if not rows or rows == prepack.NEVER:
        return {}
    w = torch.full((2048, 1024), 0.01, dtype=dtype)
    w = prepack.pack_weight(w) if prepack.supported(dtype) else w
    x = torch.full((512, 1024), 0.01, dtype=dtype)
    t_conv = _timed(lambda: prepack.upcast_linear(x[:1], w), 3)  # the weight's conversion dominates at one row
    t_all = _timed(lambda: prepack.upcast_linear(x, w), 3)
    return {"wide_rows": rows, "wide_flops": 2 * 512 * 1024 * 2048 / max(t_all - t_conv, 1e-9),
            "upcast_bps": 2048 * 1024 * dtype.itemsize / t_conv}


def _stream_rate(dtype, device=torch.device("cpu")) -> float:
    # bigger than a last-level cache, like a model's weights
    k = 4096
    n = ((96 if device.type == "cpu" else 512) << 20) // (k * dtype.itemsize)
    w = torch.full((n, k), 0.01, dtype=dtype, device=device)
    x = torch.full((4, k), 0.01, dtype=dtype, device=device)
    return w.numel() * dtype.itemsize / _timed(lambda: F.linear(x, w), 3, device)


def _copy_rate(device=torch.device("cpu")) -> float:
    a = torch.ones(64 << 20, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() / _timed(lambda: b.copy_(a), 3, device)


def _attn_rate(dtype, device=torch.device("cpu")) -> float:
    from ..models.layers import attend

    q = torch.full((8, 256, 64), 0.01, dtype=dtype, device=device)
    k = torch.full((8, 1024, 64), 0.01, dtype=dtype, device=device)
    return 2 * 2 * 8 * 256 * 1024 * 64 / _timed(lambda: attend(q, k, k, 768, 0.125), 3, device)


def _attn_call_cost(dtype, device=torch.device("cpu")) -> float:
    """One decode token's attention for each of 32 short sequences, through the model's code path."""
    from ..models.layers import attend_batch
    from .batch import ForwardBatch
    from .kv_cache import SeqKV

    n = 32
    caches = [SeqKV(1, 64, device, dtype) for _ in range(n)]
    for c in caches:
        part = torch.zeros(2, 31, 32, dtype=dtype, device=device)
        c.write(0, 0, part, part)
        c.length = 31
    batch = ForwardBatch.build(caches, [1] * n, device)
    q = torch.full((n, 4, 32), 0.01, dtype=dtype, device=device)
    kv = torch.full((n, 2, 32), 0.01, dtype=dtype, device=device)
    return _timed(lambda: attend_batch(batch, 0, q, (kv, kv), 0.2), device=device) / n


def _op_cost(device=torch.device("cpu")) -> float:
    a = torch.ones(64, device=device)
    return _timed(lambda: [torch.add(a, a) for _ in range(200)], device=device) / 200


def measure_row_cost(tokenizer, vocab: int) -> float:
    """Seconds per sampled token of bookkeeping (detokenizing, stop rules), with this tokenizer."""
    from .sampling import SamplingParams, TokenChoice
    from .sequence import Sequence

    params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
    seq = Sequence("probe", 0, [0], params, tokenizer, 1 << 30)
    toks = [(7 * i + 3) % max(vocab, 1) for i in range(200)]
    t = time.perf_counter()
    for tok in toks:
        seq.append(TokenChoice(tok), set())
        seq.take_delta()
    return (time.perf_counter() - t) / len(toks)


def measure_transfer(source, num_layers: int, num_experts: int, dtype: torch.dtype, threads: int = 4,
                     budget_s: float = 0.15) -> tuple[float, float]:
    """Expert reads from where the experts rest (the packed file; the page cache where it holds the
    bytes), as the store does them (whole slots, ``threads`` loaders), timed alone, then next to a
    matmul loop: returns (bytes/s, the share of compute time the reads hide under, 0..1).

    Measured per model and run, not cached: it depends on the disk, the page cache and how busy
    the machine's cores are.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from ..weights.direct_io import aligned_buffer

    local = threading.local()
    keys = [(layer, e) for e in range(num_experts) for layer in range(num_layers)]

    def read(i: int) -> None:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = aligned_buffer(source.layout.slot_bytes)
        source.read_into(*keys[i % len(keys)], buf)

    with ThreadPoolExecutor(threads) as pool:
        def reads(count: int) -> float:
            t = time.perf_counter()
            list(pool.map(read, range(count)))
            return time.perf_counter() - t

        first = reads(threads)
        count = max(threads, int(budget_s / max(first, 1e-6) * threads))
        t_read = reads(count)
        x = torch.full((256, 1024), 0.01, dtype=dtype)
        w = torch.full((2048, 1024), 0.01, dtype=dtype)
        one = _timed(lambda: F.linear(x, w), 3)
        reps = max(1, int(t_read / max(one, 1e-6)))

        def compute() -> float:
            t = time.perf_counter()
            for _ in range(reps):
                F.linear(x, w)
            return time.perf_counter() - t

        rates, overlaps = [], []
        for _ in range(2):  # a busy machine makes single samples noisy
            t_compute = compute()
            t = time.perf_counter()
            background = threading.Thread(target=reads, args=(count,))  # hands the reads to the pool
            background.start()
            compute()
            background.join()
            t_both = time.perf_counter() - t
            rates.append(count * source.layout.nbytes / t_read)
            overlaps.append((t_compute + t_read - t_both) / max(min(t_compute, t_read), 1e-9))
            t_read = reads(count)
    return statistics.mean(rates), min(1.0, max(0.0, statistics.mean(overlaps)))
