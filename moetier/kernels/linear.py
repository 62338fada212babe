"""``linear`` on a :class:`~moetier.kernels.quant.QuantWeight`: int kernels for few rows, float32 for many.

Decode (few rows) is bound by reading the weight, so it runs on the codes: per-channel int8 through
``torch._weight_int8pack_mm`` and int4 through ``torch._weight_int4pack_mm_for_cpu`` (each computes
in the scales' dtype). Those kernels do not batch well (measured on an AVX-512 core: at 16 rows
they are slower than the bf16 GEMM), so from :func:`quant_rows` rows on — probed at load, like the
float32 threshold of bf16 weights in ``models/prepack.py`` — the weight is dequantized to float32
and multiplied by the float32 GEMM. Grouped int8 (e.g. GGUF Q8_0 blocks) and int4 codes in an
order this CPU's kernel does not read take that float32 path at every size.

The choice depends only on the row count and the weight's kind and layout, never on where the
weight's bytes live, so a resident weight and a slot view of the same bytes (offloaded experts)
give bit-identical outputs. :func:`moetier.models.prepack.linear` is the one entry point: it
sends a QuantWeight here.
"""

from __future__ import annotations

import functools
import os
import statistics
import time

import torch
import torch.nn.functional as F

from .quant import QuantScheme, QuantWeight, int4_kernel_layout, quantize

NEVER = 1 << 62
ROWS_ENV = "MOETIER_QUANT_ROWS"  # a fixed threshold instead of the probe; 0: always the float32 path
PROBE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def has_kernel(w: QuantWeight) -> bool:
    """Whether ``w`` has an int kernel here (else it always runs dequantized in float32)."""
    if not w.codes.is_cpu:
        return False
    if w.kind == "int8":
        return w.group_size == w.shape[1] and hasattr(torch, "_weight_int8pack_mm")
    if w.kind == "int4":
        return w.shape[0] % 16 == 0 and w.layout == int4_kernel_layout()
    return False


def kernel_linear(x2: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """The int kernel on ``x2`` ``[M, K]`` in ``w.dtype`` -> ``[M, N]`` in ``w.dtype``."""
    if w.kind == "int8":
        return torch._weight_int8pack_mm(x2, w.codes, w.scales.view(w.shape[0]))
    return torch._weight_int4pack_mm_for_cpu(x2, w.codes, w.group_size, w.scales)


def quant_linear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, dequantized w, bias)`` in ``x``'s dtype; ``x`` ``[..., K]``."""
    N, K = w.shape
    rows = x.numel() // max(K, 1)
    if rows < quant_rows(w.kind, torch.get_num_threads()) and has_kernel(w):
        y = kernel_linear(x.reshape(rows, K).to(w.dtype).contiguous(), w).view(*x.shape[:-1], N).to(x.dtype)
        return y if bias is None else y + bias
    y = F.linear(x.float(), w.dequantize(torch.float32), None if bias is None else bias.float())
    return y.to(x.dtype)


@functools.lru_cache(maxsize=None)
def quant_rows(kind: str, threads: int) -> int:
    """Rows from which a ``kind`` weight runs faster dequantized in float32 than on its int kernel here,
    with ``threads`` threads: timed on a [1536, 1024] bf16-scaled weight at 1, 2, 4, ... rows up to the
    first count where the float32 path wins. Well under a second, once per process per kind;
    ``MOETIER_QUANT_ROWS`` fixes the value instead (0: never the int kernel)."""
    fixed = os.environ.get(ROWS_ENV, "").strip()
    if fixed:
        try:
            rows = int(fixed)
        except ValueError:
            raise ValueError(f"{ROWS_ENV}={fixed!r}: expected a row count (0 turns the int kernels off)") from None
        return rows if rows > 0 else 0
    g = torch.Generator().manual_seed(0)
    w = quantize(torch.randn(1536, 1024, generator=g), QuantScheme(kind), dtype=torch.bfloat16)
    if not has_kernel(w):
        return 0

    def median_s(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    with torch.inference_mode():
        for rows in PROBE_ROWS:
            x = torch.randn(rows, 1024, generator=g).to(torch.bfloat16)
            wide = median_s(lambda: F.linear(x.float(), w.dequantize(torch.float32)).to(x.dtype))
            if wide < median_s(lambda: kernel_linear(x, w)):
                return rows
    return NEVER
