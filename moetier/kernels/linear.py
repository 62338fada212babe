"""``linear`` on a :class:`~moetier.kernels.quant.QuantWeight`: int kernels for few rows, float32 for many.

Decode (few rows) is bound by reading the weight, so it runs on the codes: per-channel int8 through
``torch._weight_int8pack_mm`` and int4 through ``torch._weight_int4pack_mm_for_cpu`` (each computes
in the scales' dtype). Those kernels do not batch well (measured on an AVX-512 core: at 16 rows
they are slower than the bf16 GEMM), so from :func:`quant_rows` rows on — probed at load, like the
float32 threshold of bf16 weights in ``models/prepack.py`` — the weight is dequantized and multiplied
by a float GEMM (:func:`wide_linear`). Grouped int8 (e.g. GGUF Q8_0 blocks) and int4 codes in an
order this CPU's kernel does not read take that path at every size.

The choice depends only on the row count and the weight's kind and layout, never on where the
weight's bytes live, so a resident weight and a slot view of the same bytes (offloaded experts)
give bit-identical outputs. :func:`moetier.models.prepack.linear` is the one entry point: it
sends a QuantWeight here.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import native
from .probe import best_s, fixed_rows, median_s
from .quant import INT4_LAYOUTS, ROW_LAYOUT, QuantScheme, QuantWeight, int4_kernel_layout, quantize

NEVER = 1 << 62
ROWS_ENV = "MOETIER_QUANT_ROWS"  # a fixed threshold instead of the probe; 0: never the int kernels
NATIVE_ROWS_ENV = "MOETIER_NATIVE_ROWS"  # the same for moetier's own kernels (kernels/native); 0: never
PROBE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PROBE_REPEAT = 16  # native_rows' weight: 1536 rows repeated 16 times (48 MiB bf16, 24 MiB int8)


def has_native(w) -> bool:
    """Whether moetier's own few-row kernel (``kernels/native``) takes weight ``w`` (a QuantWeight or a plain
    bf16 tensor) here: vectorized for its kind on this CPU, contiguous, and a grouping it reads."""
    if type(w) is QuantWeight:
        if w.kind not in native.kinds() or not w.codes.is_cpu or w.shape[1] % 32:
            return False
        if w.kind == "int4":
            return w.layout == ROW_LAYOUT
        G, K = w.group_size, w.shape[1]
        return G == K or G == 32 or G % 64 == 0
    return (w.dtype == torch.bfloat16 and w.layout == torch.strided and w.is_cpu and w.dim() == 2
            and w.is_contiguous() and "bf16" in native.kinds())


def native_kind(w) -> str:
    """The kind :func:`native_rows` is asked for about weight ``w`` (a QuantWeight's kind, else ``"bf16"``)."""
    return w.kind if type(w) is QuantWeight else "bf16"


def native_linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear`` through the native kernel (:func:`has_native` must hold) -> ``x``'s dtype."""
    K = w.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.dtype not in native.IO_KINDS:
        x2 = x2.float()
    y = native.gemv(x2.contiguous(), w).view(*x.shape[:-1], w.shape[0])
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    return y if bias is None else y + bias


@functools.lru_cache(maxsize=None)
def native_rows(kind: str, threads: int) -> int:
    """Rows from which torch's kernels beat moetier's own for a ``kind`` (``"bf16"``, ``"int8"``, ``"int4"``) weight
    here with ``threads`` threads (0 where the native kernel does not run): timed at 2, 4, 8, ... rows (one row
    always runs native), best of 5 each, on a [1536, 1024] weight repeated down to 24576 rows for bf16 and int8,
    so that it streams from memory as a model's weights do (a weight that stays in cache favours torch's kernels,
    which do more work per byte). ``MOETIER_NATIVE_ROWS`` fixes the value (0: never the native kernels)."""
    rows = fixed_rows(NATIVE_ROWS_ENV, "the native kernels")
    if rows is not None:
        return max(rows, 0)
    if kind not in native.kinds():
        return 0
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 1024, generator=g)
    if kind == "bf16":
        from ..models.prepack import plain_linear

        w = w.to(torch.bfloat16).repeat(PROBE_REPEAT, 1)

        def other(x):
            return plain_linear(x, w)
    else:
        w = quantize(w, QuantScheme(kind), dtype=torch.bfloat16)
        ref = quantize(w.dequantize(), QuantScheme(kind), dtype=torch.bfloat16,
                       layout=int4_kernel_layout() if kind == "int4" else None)
        if kind == "int8":  # per-channel: rows repeat as they are (int4's torch layout is blocked; it stays small)
            w, ref = (QuantWeight("int8", (q.shape[0] * PROBE_REPEAT, q.shape[1]), q.group_size,
                                  q.codes.repeat(PROBE_REPEAT, 1), q.scales.repeat(PROBE_REPEAT, 1)) for q in (w, ref))

        def other(x):
            if x.shape[0] < quant_rows(kind, threads) and has_kernel(ref):
                return kernel_linear(x, ref)
            return wide_linear(x, ref)
    with torch.inference_mode():
        for rows in PROBE_ROWS[1:]:  # one row is always native: it skips the other kernels' fixed cost
            x = torch.randn(rows, 1024, generator=g).to(torch.bfloat16)
            if best_s(lambda: other(x)) < best_s(lambda: native_linear(x, w)):
                return rows
    return NEVER


def has_kernel(w: QuantWeight) -> bool:
    """Whether ``w`` has an int kernel here (else every call takes :func:`wide_linear`)."""
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
    if has_native(w) and rows < native_rows(w.kind, torch.get_num_threads()):
        return native_linear(x, w, bias)
    x2 = x.reshape(rows, K)
    if rows < quant_rows(w.kind, torch.get_num_threads()) and has_kernel(w):
        y = kernel_linear(x2.to(w.dtype).contiguous(), w).to(x.dtype)
    else:
        y = wide_linear(x2, w)
    y = y.view(*x.shape[:-1], N)
    return y if bias is None else y + bias


def wide_linear(x2: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """Many rows ``x2`` ``[M, K]``: dequantize and use a float GEMM -> ``[M, N]`` in ``x2``'s dtype.

    Per-channel int8: the codes, exact in any float dtype, through the plain-weight ``linear`` in
    ``x``'s dtype (bf16 on AMX, float32 from ``upcast_rows`` elsewhere: models/prepack.py), then the
    per-row scales on the output. int4 in a split code order: unpacked block by block straight
    into float32 ``[N / b, K, b]`` slices (the transposed weight), one batched float32 GEMM. Else
    the weight is dequantized to float32."""
    from ..models.prepack import linear

    N, K = w.shape
    dt = x2.dtype if x2.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
    if w.kind == "int8" and w.group_size == K:
        return (linear(x2.to(dt), w.codes.to(dt)) * w.scales.view(N).to(dt)).to(x2.dtype)
    torch_order = INT4_LAYOUTS.get(w.layout)
    if w.kind == "int4" and torch_order and torch_order[1] and N % torch_order[0] == 0:
        b = INT4_LAYOUTS[w.layout][0]
        G, NB = w.group_size, N // b
        packed = w.codes.reshape(NB, K, b // 2)
        wt = torch.empty(NB, K, b, device=w.codes.device)  # [N/b, K, b]: block i holds rows i*b .. i*b+b-1, transposed
        wt[..., : b // 2].copy_(packed & 15)
        wt[..., b // 2 :].copy_(packed >> 4)
        sz = w.scales.float().view(K // G, NB, 1, b, 2).permute(1, 0, 2, 3, 4)  # [N/b, K/G, 1, b, 2]
        scale = sz[..., 0].contiguous()
        offset = (sz[..., 1] - 8 * sz[..., 0]).contiguous()  # (q - 8) * scale + zero = q * scale + offset
        wt.view(NB, K // G, G, b).mul_(scale).add_(offset)
        y = torch.matmul(x2.float(), wt)  # [N/b, M, b]
        return y.permute(1, 0, 2).reshape(x2.shape[0], N).to(x2.dtype)
    return F.linear(x2.float(), w.dequantize(torch.float32)).to(x2.dtype)


@functools.lru_cache(maxsize=None)
def quant_rows(kind: str, threads: int) -> int:
    """Rows from which a ``kind`` weight runs faster dequantized (:func:`wide_linear`) than on its int kernel here,
    with ``threads`` threads: timed on a [1536, 1024] bf16-scaled weight at 1, 2, 4, ... rows up to the
    first count where the float32 path wins. Well under a second, once per process per kind;
    ``MOETIER_QUANT_ROWS`` fixes the value instead (0: never the int kernel)."""
    rows = fixed_rows(ROWS_ENV, "the int kernels")
    if rows is not None:
        return rows if rows > 0 else 0
    g = torch.Generator().manual_seed(0)
    w = quantize(torch.randn(1536, 1024, generator=g), QuantScheme(kind), dtype=torch.bfloat16)
    if not has_kernel(w):
        return 0

    with torch.inference_mode():
        for rows in PROBE_ROWS:
            x = torch.randn(rows, 1024, generator=g).to(torch.bfloat16)
            wide = median_s(lambda: wide_linear(x, w))
            if wide < median_s(lambda: kernel_linear(x, w)):
                return rows
    return NEVER
