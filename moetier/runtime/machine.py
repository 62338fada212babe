"""This machine's rates, measured by small timed probes and cached per machine.

:class:`MachineProfile` times a matmul, a skinny (weight-streaming) matmul, a memory copy, an
attention call, a small op and the fixed costs of moetier's own code paths (a matmul call, a
routed expert, a MoE layer, a pooled decode attention, a layer; well under 2 s on an idle machine)
once per machine, thread count and dtype, in the probing thread's CPU time on the CPU, and caches
them as JSON under ``~/.cache/moetier/machine.json``. The rates that depend on the model or on
where its experts rest (per-token bookkeeping with its tokenizer, expert reads from its packed
file, whose speed also depends on the page cache) are measured per model, and the share of the CPU
this process gets on a busy machine per plan.
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

# 2: attention of decoding sequences batched into one call; 3: the wide-matmul path; 4: fixed costs of the
# model's own code paths (a matmul call, a routed expert, a MoE layer, a pooled decode attention, a layer);
# 5: timed in the probing thread's CPU time on the CPU
PROFILE_VERSION = 5


@dataclass
class MachineProfile:
    """Measured rates of this machine for one dtype (all per second or seconds per call)."""

    matmul_flops: float  # FLOP/s of a large matmul
    stream_bps: float  # weight bytes/s a skinny matmul (a few rows) reads: the decode regime
    copy_bps: float  # bytes/s of a large memory copy, read + write counted
    attn_flops: float  # FLOP/s of a prefill-sized attention call
    attn_call_s: float  # fixed cost of one prompt chunk's attention in one layer (cache write + masked SDPA)
    op_s: float  # fixed cost of one small torch op
    # bf16 on the CPU: calls of ``wide_rows`` rows or more upcast to float32 (models/prepack.py; 0: never),
    # multiplying at ``wide_flops`` after converting their weight at ``upcast_bps`` (bf16 bytes/s)
    wide_rows: int = 0
    wide_flops: float = 0.0
    upcast_bps: float = 0.0
    # fixed costs (seconds) of moetier's own code, timed at sizes where the arithmetic is negligible: at a
    # small model's sizes and decode batches they, not FLOPs or bytes, set the time of a pass
    linear_call_s: float = 0.0  # one matmul call (models.prepack.linear)
    expert_call_s: float = 0.0  # one routed expert that gets tokens, beyond its two matmul calls
    moe_call_s: float = 0.0  # one MoE layer: router, sort and gather of the tokens, weighted sum
    attn_group_s: float = 0.0  # one layer's attention of all decoding sequences on the KV pool
    layer_s: float = 0.0  # one decoder layer's norms, rotary and residual adds
    seq_s: float = 0.0  # one sequence's step bookkeeping (batch layout, positions, commit)
    threads: int = 1
    measured_at: float = 0.0

    @classmethod
    def measure(cls, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "MachineProfile":
        """Time the probes now on ``device`` (about half a second)."""
        d = torch.device(device)
        with torch.inference_mode():
            linear_s = _linear_call_cost(dtype, d)
            chunk_s, group_s, seq_s = _attn_call_costs(dtype, d)
            return cls(
                matmul_flops=_matmul_rate(dtype, d), stream_bps=_stream_rate(dtype, d), copy_bps=_copy_rate(d),
                attn_flops=_attn_rate(dtype, d), attn_call_s=chunk_s, op_s=_op_cost(d),
                **_wide_rates(dtype, d), linear_call_s=linear_s, **_moe_costs(dtype, d, linear_s),
                attn_group_s=group_s, layer_s=_layer_cost(dtype, d), seq_s=seq_s,
                threads=torch.get_num_threads(), measured_at=time.time(),
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
    """Median seconds of ``fn``. On the CPU, the CPU time of this thread rather than the wall clock:
    the rates are cached for good, and on a shared machine the wall clock of a probe counts whatever
    else ran meanwhile (the planner's explanation says when the machine is busy instead)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    fn()  # warm up (allocations, kernel choice)
    sync(device)
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        sync(device)
        times.append(clock() - t)
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


def _attn_call_costs(dtype, device=torch.device("cpu")) -> tuple[float, float, float]:
    """Through the model's code path (``attend_batch``), as the throughput runner calls it: (one prompt
    chunk's attention, per sequence: 8 sequences of 8 tokens; one layer's pooled attention of 32
    decoding sequences; one sequence's share of building, committing and indexing a step's batch)."""
    from ..models.layers import attend_batch
    from .batch import ForwardBatch
    from .kv_cache import KVPool, SeqKV

    n, hq, hk, d = 32, 4, 2, 32
    pool = KVPool(1, n, 64, device, dtype)
    caches = [pool.take() for _ in range(n)]
    part = torch.zeros(hk, 31, d, dtype=dtype, device=device)
    for c in caches:
        c.write(0, 0, part, part)
        c.length = 31
    batch = ForwardBatch.build(caches, [1] * n, device)
    q = torch.full((n, hq, d), 0.01, dtype=dtype, device=device)
    kv = torch.full((n, hk, d), 0.01, dtype=dtype, device=device)
    group = _timed(lambda: attend_batch(batch, 0, q, (kv, kv), 0.2), device=device)

    def step() -> None:  # what forward_step does per sequence around the model (positions, commit)
        b = ForwardBatch.build(caches, [1] * n, device)
        b.decode_group()
        b.last_token_indices()
        b.commit()
        for c in caches:
            c.length = 31

    per_seq = _timed(step, device=device) / n
    m, c = 8, 8
    chunks = [SeqKV(1, 64, device, dtype) for _ in range(m)]
    pb = ForwardBatch.build(chunks, [c] * m, device)
    qp = torch.full((m * c, hq, d), 0.01, dtype=dtype, device=device)
    kvp = torch.full((m * c, hk, d), 0.01, dtype=dtype, device=device)
    chunk = _timed(lambda: attend_batch(pb, 0, qp, (kvp, kvp), 0.2), device=device) / m
    return chunk, group, per_seq


def _linear_call_cost(dtype, device=torch.device("cpu")) -> float:
    """One call of the model's matmul (``models.prepack.linear``, packed where the model packs) on a
    weight so small that the call is all there is to it."""
    from ..models import prepack

    w = torch.full((64, 64), 0.01, dtype=dtype, device=device)
    if device.type == "cpu" and prepack.supported(dtype):
        w = prepack.pack_weight(w)
    x = torch.full((1, 64), 0.01, dtype=dtype, device=device)
    return _timed(lambda: [prepack.linear(x, w) for _ in range(50)], device=device) / 50


def _moe_costs(dtype, device, linear_s: float) -> dict:
    """A tiny MoE layer (8 experts of 64 x 64, 64 tokens, top-2) through the model's router and
    ``Experts`` code: the cost of each expert that gets tokens (from 2 vs 8 experts used) and of the
    layer around them, less the matmul calls (``linear_s`` each) that ``ModelCost`` counts apart."""
    from ..models.moe import Experts, SoftmaxTopKRouter

    E, H, T = 8, 64, 64
    experts = Experts(E, H, H).to(device=device, dtype=dtype)
    router = SoftmaxTopKRouter(H, E, 2, True).to(device=device, dtype=dtype)
    for p in (*experts.parameters(), *router.parameters()):
        p.data.fill_(0.01)
    x = torch.full((T, H), 0.01, dtype=dtype, device=device)
    w = torch.full((T, 2), 0.5, device=device)

    def ids(used: int) -> torch.Tensor:  # [T, 2]: token t goes to experts t and t+1 (mod used)
        a = torch.arange(T, device=device) % used
        return torch.stack([a, (a + 1) % used], dim=1)

    two, eight = ids(2), ids(8)
    t2 = _timed(lambda: experts(x, two, w), device=device)
    t8 = _timed(lambda: experts(x, eight, w), device=device)
    t_router = _timed(lambda: router(x), device=device)
    expert = max(0.0, (t8 - t2) / 6 - 2 * linear_s)
    layer = max(0.0, t_router + t2 - 2 * expert - 5 * linear_s)
    return {"expert_call_s": expert, "moe_call_s": layer}


def _layer_cost(dtype, device=torch.device("cpu")) -> float:
    """A decoder layer's work outside its matmuls, attention and experts: two RMSNorms, the rotary
    embedding of q and k and two residual adds, on 64 tokens of a tiny layer."""
    from ..models.args import RopeArgs
    from ..models.layers import RMSNorm, Rotary

    T, H, hq, hk, d = 64, 64, 4, 2, 16
    norm = RMSNorm(H, 1e-5).to(device=device, dtype=dtype)
    rotary = Rotary(d, RopeArgs(), 4096)
    x = torch.full((T, H), 0.01, dtype=dtype, device=device)
    q = torch.full((T, hq, d), 0.01, dtype=dtype, device=device)
    k = torch.full((T, hk, d), 0.01, dtype=dtype, device=device)
    pos = torch.arange(T, device=device)

    def layer() -> torch.Tensor:
        y = x + norm(x)
        rotary(q, pos)
        rotary(k, pos)
        return y + norm(y)

    return _timed(lambda: [layer() for _ in range(10)], device=device) / 10


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
    t = time.thread_time()  # CPU time, as in _timed
    for tok in toks:
        seq.append(TokenChoice(tok), set())
        seq.take_delta()
    return (time.thread_time() - t) / len(toks)


def measure_cpu_share(seconds: float = 0.25) -> float:
    """The share of wall time this thread runs now (1 on an idle machine), from a loop of small
    matmuls: the profile's rates are CPU time, and on a busy machine a run gets this share of it.
    Measured per plan, not cached: it changes as other processes come and go."""
    x = torch.full((64, 256), 0.01)
    w = torch.full((256, 256), 0.01)
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    while time.perf_counter() - wall0 < seconds:
        F.linear(x, w)
    return min(1.0, (time.thread_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9))


def cached_experts(source, num_layers: int, num_experts: int) -> Optional[set]:
    """The (MoE layer, expert) keys whose whole region the page cache holds now (``mincore``: asks,
    never reads); None where that cannot be told (not a packed file, no ``mincore``)."""
    from ..weights.direct_io import PageCache

    packed, layers = getattr(source, "packed", None), getattr(source, "layers", None)
    if packed is None or layers is None:
        return None
    maps: dict = {}
    out = set()
    try:
        for layer in range(num_layers):
            for e in range(num_experts):
                r = packed.expert_region(layers[layer], e)
                if r.path not in maps:
                    fd = os.open(r.path, os.O_RDONLY)
                    try:
                        maps[r.path] = PageCache(fd)
                    finally:
                        os.close(fd)  # the map keeps what it needs
                if maps[r.path].resident_prefix(r.offset, r.nbytes) >= r.nbytes:
                    out.add((layer, e))
    except (OSError, ValueError, AttributeError):
        return None
    finally:
        for m in maps.values():
            m.close()
    return out


@dataclass
class Transfer:
    """How fast expert loads run on this machine now, and from where (see :func:`measure_transfer`)."""

    read_bps: float  # expert bytes/s, the page-cache and disk shares weighted as the run will see them
    overlap: float  # share of compute time the reads hide under, 0..1
    cached: Optional[int]  # experts whose bytes the page cache holds (None: unknown)
    experts: int  # experts in all
    direct: bool  # uncached bytes come by O_DIRECT (they stay uncached); False: buffered reads

    def where(self) -> str:
        """Where the reads come from, in words."""
        disk = "the disk by O_DIRECT" if self.direct else "the disk by buffered reads"
        if self.cached is None:
            return f"the packed file (page cache or {disk.removeprefix('the ')}: unknown)"
        if self.cached == self.experts:
            return f"the page cache (all {self.experts} experts' bytes cached)"
        if self.cached == 0:
            return f"{disk} (no expert's bytes in the page cache)"
        return f"the page cache for {self.cached} of {self.experts} experts, {disk} for the rest"


def measure_transfer(source, num_layers: int, num_experts: int, dtype: torch.dtype, threads: int = 4,
                     budget_s: float = 0.3) -> Transfer:
    """Expert reads from where the experts rest, as the store does them (whole slots, ``threads``
    loaders), timed alone, then next to a matmul loop.

    The packed file's regions come from the page cache where it holds them and from the disk
    (O_DIRECT, which leaves the cache as it is) where it does not, at rates ten times apart: the
    cached and uncached experts are timed apart (each on regions spread over the whole file) and
    weighted by their shares, so the rate is the one a pass that reads every expert sees.

    Measured per model and run, not cached: it depends on the disk, the page cache and how busy
    the machine's cores are.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from ..weights.direct_io import aligned_buffer

    local = threading.local()
    every = [(layer, e) for e in range(num_experts) for layer in range(num_layers)]
    cached = cached_experts(source, num_layers, num_experts)
    groups = [every] if cached is None else [g for g in ([k for k in every if k in cached],
                                                         [k for k in every if k not in cached]) if g]
    reader = getattr(getattr(source, "packed", None), "reader", None)
    direct = bool(getattr(reader, "direct", False))
    nbytes = source.layout.nbytes

    def read(key) -> None:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = aligned_buffer(source.layout.slot_bytes)
        source.read_into(*key, buf)

    with ThreadPoolExecutor(threads) as pool:
        def reads(keys: list, count: int) -> float:
            # every step-th key: a prefix of the reads covers the whole file, not its first experts
            step = max(1, len(keys) // max(count, 1))
            t = time.perf_counter()
            list(pool.map(read, [keys[(i * step + i // len(keys)) % len(keys)] for i in range(count)]))
            return time.perf_counter() - t

        seconds_per_byte, counts = 0.0, []
        for g in groups:
            first = reads(g, threads)
            count = max(threads, int(budget_s / 3 / len(groups) / max(first, 1e-6) * threads))
            # the median of three: a run meets the disk and the cores as busy as they usually are
            rate = count * nbytes / statistics.median(reads(g, count) for _ in range(3))
            seconds_per_byte += len(g) / len(every) / rate
            counts.append(count)
        read_bps = 1 / seconds_per_byte
        count = max(threads, int(budget_s * read_bps / nbytes))
        t_read = count * nbytes / read_bps
        x = torch.full((256, 1024), 0.01, dtype=dtype)
        w = torch.full((2048, 1024), 0.01, dtype=dtype)
        one = _timed(lambda: F.linear(x, w), 3)
        reps = max(1, int(t_read / max(one, 1e-6)))

        def compute() -> float:
            t = time.perf_counter()
            for _ in range(reps):
                F.linear(x, w)
            return time.perf_counter() - t

        overlaps = []
        for _ in range(2):  # a busy machine makes single samples noisy
            t_compute = compute()
            t = time.perf_counter()
            background = threading.Thread(target=reads, args=(every, count))  # hands the reads to the pool
            background.start()
            compute()
            background.join()
            t_both = time.perf_counter() - t
            overlaps.append((t_compute + t_read - t_both) / max(min(t_compute, t_read), 1e-9))
    return Transfer(read_bps=read_bps, overlap=min(1.0, max(0.0, statistics.mean(overlaps))),
                    cached=None if cached is None else len(cached), experts=len(every), direct=direct)
