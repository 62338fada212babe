"""moetier's own few-row kernels (``gemv.c``), compiled for this CPU on first use and called through ctypes.

Decode multiplies one to a few rows by each weight: the time is reading the weight, plus the fixed
cost of each call. oneDNN's bf16 kernel costs ~16-20 µs a call before it reads anything, and
torch's int kernels read int codes with float activations. These kernels read the weight once for
all rows, quantize the rows to int8 per 32 (as llama.cpp does) for int8/int4 weights and use
AVX-512 VNNI / BF16 dot products; a call costs a few µs.

The library is built with the C compiler (``CC``, default ``cc``) and ``-O3 -march=native -fopenmp``
into ``$MOETIER_CACHE/kernels`` (default ``~/.cache/moetier/kernels``), keyed by the source, the
compiler and this CPU, once per machine (about a second). It links the OpenMP runtime torch has
already loaded, so one thread pool serves both. Without a compiler, or with ``MOETIER_NATIVE=0``,
:func:`lib` is None and the callers keep torch's kernels; :func:`kinds` says which weight kinds run
vectorized here (a kind without AVX-512 stays on torch's kernels too).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("moetier.kernels")

SOURCE = Path(__file__).with_name("gemv.c")
ENV = "MOETIER_NATIVE"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
F_BF16, F_INT8, F_INT4 = 1, 2, 4
SCALE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
IO_KINDS = {torch.float32: 0, torch.bfloat16: 1}


def cache_dir() -> Path:
    root = os.environ.get("MOETIER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moetier")
    return Path(root) / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(keep)))


def _build(cc: str) -> Optional[Path]:
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.info("native kernels off: no C compiler (%s)", e)
        return None
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + version.encode() + _cpu_id().encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = cache_dir() / f"gemv-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gemv-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode:
            log.warning("native kernels off: %s failed to build %s:\n%s", cc, SOURCE.name, proc.stderr[-2000:])
            return None
        os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same bytes
        return out
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("native kernels off: building %s failed (%s)", SOURCE.name, e)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def lib() -> Optional[ctypes.CDLL]:
    """The compiled library, or None (no compiler, a failed build, ``MOETIER_NATIVE=0``)."""
    if os.environ.get(ENV, "").strip() == "0":
        return None
    if platform.system() != "Linux":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        log.info("native kernels off: no C compiler on PATH")
        return None
    path = _build(cc)
    if path is None:
        return None
    try:
        so = ctypes.CDLL(str(path))
    except OSError as e:
        log.warning("native kernels off: cannot load %s (%s)", path, e)
        return None
    i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    so.mt_features.restype = i32
    so.mt_gemv.argtypes = [i32, p, p, i32, i64, i64, i64, p, i32, i64, p, i32, i32, i32]
    so.mt_moe1.argtypes = [p, p, i32, p, i32, p, i32, i32, i32]
    so.mt_moe.argtypes = [p, i32, p, p, i64, i32, p, i32, p, i32, i32, i32]
    so.mt_gemv.restype = so.mt_moe1.restype = so.mt_moe.restype = i32
    return so


@functools.lru_cache(maxsize=None)
def kinds() -> frozenset:
    """The weight kinds (``"bf16"``, ``"int8"``, ``"int4"``) these kernels run vectorized on this CPU."""
    so = lib()
    if so is None:
        return frozenset()
    f = so.mt_features()
    return frozenset(k for k, bit in (("bf16", F_BF16), ("int8", F_INT8), ("int4", F_INT4)) if f & bit)


class WDesc(ctypes.Structure):
    """gemv.c's ``wdesc``: one weight as the kernels read it."""

    _fields_ = [("kind", ctypes.c_int), ("sk", ctypes.c_int), ("N", ctypes.c_int64), ("K", ctypes.c_int64),
                ("G", ctypes.c_int64), ("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p)]


class Expert(ctypes.Structure):
    _fields_ = [("gate_up", WDesc), ("down", WDesc)]


W_BF16, W_INT8, W_INT4 = 0, 1, 2


def describe(w) -> tuple:
    """``(kind, codes, scales, scale kind, group, N, K)`` of a bf16 tensor or an int8 / int4 (``rows``) QuantWeight."""
    if isinstance(w, torch.Tensor):
        return (W_BF16, w.data_ptr(), None, 0, 0, w.shape[0], w.shape[1])
    kind = W_INT8 if w.kind == "int8" else W_INT4
    return (kind, w.codes.data_ptr(), w.scales.data_ptr(), SCALE_KINDS[w.scales.dtype], w.group_size, *w.shape)


def wdesc(w) -> WDesc:
    """The kernels' view of a bf16 tensor or an int8 / int4 (``rows``) QuantWeight."""
    kind, codes, scales, sk, G, N, K = describe(w)
    return WDesc(kind, sk, N, K, G, codes, scales)


def gemv(x2: torch.Tensor, w, out: Optional[torch.Tensor] = None, vectorized: bool = True) -> torch.Tensor:
    """``x2`` ``[M, K]`` (bf16 or float32, contiguous, CPU) times weight ``w`` -> ``[M, N]`` in ``x2``'s dtype.

    ``w``: a bf16 ``[N, K]`` tensor or a :class:`~moetier.kernels.quant.QuantWeight` of kind int8
    or int4 (int4 in the ``rows`` layout). ``vectorized=False`` runs the plain-C twin (tests)."""
    kind, codes, scales, sk, G, N, K = describe(w)
    M = x2.shape[0]
    xk = IO_KINDS[x2.dtype]
    y = out if out is not None else torch.empty(M, N, dtype=x2.dtype)
    if lib().mt_gemv(kind, codes, scales, sk, G, N, K, x2.data_ptr(), xk, M, y.data_ptr(), xk,
                     torch.get_num_threads(), vectorized):
        raise RuntimeError(f"native kernel refused {w!r} with input {list(x2.shape)} (shape, group or memory)")
    return y


_experts: dict = {}


def _expert(gate_up, down) -> Expert:
    key = describe(gate_up) + describe(down)  # the pointers and shapes: all a descriptor holds
    e = _experts.get(key)
    if e is None:
        if len(_experts) > 65536:
            _experts.clear()
        e = _experts[key] = Expert(wdesc(gate_up), wdesc(down))
    return e


def moe1(x: torch.Tensor, experts: list, weights: list[float], vectorized: bool = True) -> torch.Tensor:
    """One token ``x`` ``[1, H]`` through its routed experts: ``sum_j weights[j] * down_j(silu(gate_j x) * up_j x)``,
    rounded where the unfused path rounds (``models/moe.py``). ``experts``: ``(gate_up, down)`` pairs (bf16
    tensors or QuantWeights). Returns ``[1, H]`` in ``x``'s dtype."""
    k = len(experts)
    arr = (Expert * k)(*[_expert(gu, dn) for gu, dn in experts])
    w = (ctypes.c_float * k)(*weights)
    out = torch.empty_like(x)
    xk = IO_KINDS[x.dtype]
    if lib().mt_moe1(arr, w, k, x.data_ptr(), xk, out.data_ptr(), xk, torch.get_num_threads(), vectorized):
        raise RuntimeError(f"native expert kernel refused {k} experts on input {list(x.shape)}")
    return out


def moe(x: torch.Tensor, experts: list, slots: list[int], weights: torch.Tensor, vectorized: bool = True) -> torch.Tensor:
    """The routed experts of ``x`` ``[T, H]`` with each expert run once on all of its tokens: token ``t``'s output is
    ``sum_j weights[t, j] * down(silu(gate x_t) * up x_t)`` of expert ``experts[slots[t * k + j]]``, rounded and
    summed as the unfused path (``models/moe.py``) does. ``experts``: ``(gate_up, down)`` pairs; ``weights``
    ``[T, k]`` float32. Returns ``[T, H]`` in ``x``'s dtype."""
    T, k = weights.shape
    arr = (Expert * len(experts))(*[_expert(gu, dn) for gu, dn in experts])
    sl = (ctypes.c_int32 * len(slots))(*slots)
    w = weights.contiguous()
    out = torch.empty_like(x)
    xk = IO_KINDS[x.dtype]
    if (len(slots) != T * k or w.dtype != torch.float32 or
            lib().mt_moe(arr, len(experts), sl, w.data_ptr(), T, k, x.data_ptr(), xk, out.data_ptr(), xk,
                         torch.get_num_threads(), vectorized)):
        raise RuntimeError(f"native expert kernel refused {len(experts)} experts on input {list(x.shape)}")
    return out
