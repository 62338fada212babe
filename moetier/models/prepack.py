"""Pre-packed bf16 weights for oneDNN on the CPU: the same results, up to twice the decode speed.

``F.linear`` in bf16 on the CPU goes through oneDNN, which reorders the weight into its
blocked layout on every call; at decode sizes that reorder costs as much as the matmul
(measured on an AVX-512 BF16 core: a [7168, 1024] weight read at 14 GB/s with one token,
25 GB/s pre-packed; fp32 already reads at 27). Packing once at load removes it. The
packed op is the kernel ``F.linear`` itself ends in, so outputs are bit-identical — which
:func:`supported` checks on this machine before anything is packed, so offloaded experts
(slot views, never packed) still match resident ones bit for bit.

Wide matmuls. On CPUs without AMX, oneDNN's bf16 GEMM runs at about half the float32 GEMM's
rate (measured on an AVX-512 BF16 core: 85 vs 155 GFLOP/s at 512 rows). Once a call has enough
rows to pay for converting its weight, :func:`linear` therefore upcasts the weight and the rows
to float32, multiplies in float32 and rounds the result to bf16. bf16 x bf16 products are exact
in float32 and both kernels accumulate in float32, so the two differ only in summation order (a
rounding step in about one output element in 5,000). :func:`upcast_rows` times both kernels on
this machine and returns the row count from which the float32 path wins, for the slower-to-upcast
packed form, and one threshold serves packed and plain weights alike: resident and offloaded
experts still take the same path at every batch size and stay bit-identical.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.linear import has_native, native_linear, native_rows, quant_linear
from ..kernels.probe import fixed_rows, median_s
from ..kernels.quant import QuantWeight


def _packed_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` ``[out, in]`` in oneDNN's layout, for :func:`linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)


def keep_shape_only(module: nn.Module, name: str) -> None:
    """Replace parameter ``name`` by a meta tensor of its shape and dtype once a packed copy holds its values."""
    p = getattr(module, name)
    setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False))


NEVER = 1 << 62  # upcast_rows() where the float32 path never wins
UPCAST_ENV = "MOETIER_UPCAST_ROWS"  # a fixed threshold instead of the probe; 0 turns upcasting off
PROBE_ROWS = (32, 64, 96, 128, 192, 256, 384, 512)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for a plain or a packed weight, in float32 for wide bf16 inputs (see above),
    or for a quantized one (``kernels/linear.py``)."""
    if type(w) is QuantWeight:
        return quant_linear(x, w, bias)
    if x.dtype == torch.bfloat16 and x.is_cpu and has_native(w):
        if x.numel() // max(x.shape[-1], 1) < native_rows("bf16", torch.get_num_threads()):
            return native_linear(x, w, bias)
    return plain_linear(x, w, bias)


def plain_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`linear` on a plain or packed float weight, without moetier's own kernels."""
    if x.dtype == torch.bfloat16 and x.is_cpu and x.dim() >= 2:
        rows = x.numel() // max(x.shape[-1], 1)
        if rows >= upcast_rows(torch.get_num_threads()):
            return upcast_linear(x, w, bias)
    return _packed_linear(x, w, bias) if w.layout == torch._mkldnn else F.linear(x, w, bias)


def upcast_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` in float32 on bf16 ``x`` and ``w`` (plain or packed), rounded back to bf16."""
    w32 = w.to_dense(torch.float32) if w.layout == torch._mkldnn else w.float()
    return F.linear(x.float(), w32, None if bias is None else bias.float()).to(x.dtype)


@functools.lru_cache(maxsize=None)
def upcast_rows(threads: int) -> int:
    """Rows from which a bf16 matmul is faster as :func:`upcast_linear` here, with ``threads``
    threads (:data:`NEVER` if it never is): the bf16 kernel on a packed weight timed against
    upcasting that weight, at 512, 256, ... rows until the float32 path stops winning by 10%.
    Well under a second, once per process; ``MOETIER_UPCAST_ROWS`` fixes the value instead."""
    rows = fixed_rows(UPCAST_ENV, "upcasting")
    if rows is not None:
        return rows if rows > 0 else NEVER
    if not torch.backends.mkldnn.is_available():
        return NEVER
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 1024, generator=g).to(torch.bfloat16)
    w = pack_weight(w) if supported(torch.bfloat16) else w
    kernel = _packed_linear if w.layout == torch._mkldnn else F.linear

    best = NEVER
    with torch.inference_mode():
        for rows in sorted(PROBE_ROWS, reverse=True):
            x = torch.randn(rows, 1024, generator=g).to(torch.bfloat16)
            if median_s(lambda: upcast_linear(x, w)) > 0.9 * median_s(lambda: kernel(x, w)):
                break
            best = rows
    return best


@functools.lru_cache(maxsize=None)
def supported(dtype: torch.dtype) -> bool:
    """Whether packing works here for ``dtype`` and gives exactly ``F.linear``'s results."""
    if dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(96, 80, generator=g).to(dtype)
        packed = pack_weight(w)
        return all(torch.equal(F.linear(x, w), _packed_linear(x, packed))
                   for x in (torch.randn(n, 80, generator=g).to(dtype) for n in (1, 5, 64)))
    except (RuntimeError, AttributeError):  # a torch build without these oneDNN ops
        return False


def native_first() -> bool:
    """Whether bf16 weights stay plain for moetier's own few-row kernel (``kernels/native``) instead of being
    packed: where that kernel runs and the CPU has no AMX (with AMX, oneDNN's packed bf16 GEMM is the faster
    choice at every size, and a packed weight cannot be read by the native kernel)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return not amx and native_rows("bf16", torch.get_num_threads()) > 0


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight lives in oneDNN's layout; ``weight`` keeps only its shape (meta)."""

    packed: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.packed, self.bias)


class DispatchedLinear(nn.Linear):
    """An ``nn.Linear`` on a plain bf16 weight that multiplies through :func:`linear`: moetier's own kernel for
    few rows, the float32 path for wide calls, the bf16 kernel between (``F.linear`` alone would take oneDNN's
    bf16 GEMM at every width, at about half the float32 rate on CPUs without AMX)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _dispatch_plain(model: nn.Module) -> int:
    """Every bf16 CPU ``nn.Linear`` of ``model`` as a :class:`DispatchedLinear` (the weight untouched, so tied and
    directly read weights included); how many."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu":
            m.__class__ = DispatchedLinear
            n += 1
    return n


def prepack(model: nn.Module) -> int:
    """Pack the bf16 CPU weights of ``model``'s linear layers and resident experts in place.

    Skipped: weights shared with another module (a tied LM head) and those a module reads
    directly (listed in its ``keep_unpacked``, e.g. DeepSeek's ``kv_b_proj``). Returns how
    many weight matrices were packed. Where bf16 weights stay plain for moetier's own kernel
    (:func:`native_first`), none is packed: the linear layers multiply through :func:`linear` instead.
    """
    from .moe import Experts

    weights = [p for p in model.parameters() if p.device.type == "cpu"]
    if not weights or weights[0].dtype != torch.bfloat16:
        return 0
    if native_first():
        _dispatch_plain(model)
        upcast_rows(torch.get_num_threads())
        return 0
    if not supported(weights[0].dtype):
        return 0
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    n = 0
    for parent in model.modules():
        keep = getattr(parent, "keep_unpacked", ())
        for name, m in parent.named_children():
            if (type(m) is nn.Linear and name not in keep and counts[id(m.weight)] == 1
                    and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"):
                m.register_buffer("packed", pack_weight(m.weight), persistent=False)
                keep_shape_only(m, "weight")
                m.__class__ = PackedLinear
                n += 1
            elif isinstance(m, Experts) and m.gate_up_proj.dtype == torch.bfloat16:
                n += m.prepack()
    upcast_rows(torch.get_num_threads())  # probe now, at load, rather than in the first request
    return n
