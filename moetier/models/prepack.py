"""Pre-packed bf16 weights for oneDNN on the CPU: the same results, up to twice the decode speed.

``F.linear`` in bf16 on the CPU goes through oneDNN, which reorders the weight into its
blocked layout on every call; at decode sizes that reorder costs as much as the matmul
(measured on an AVX-512 BF16 core: a [7168, 1024] weight read at 14 GB/s with one token,
25 GB/s pre-packed; fp32 already reads at 27). Packing once at load removes it. The
packed op is the kernel ``F.linear`` itself ends in, so outputs are bit-identical — which
:func:`supported` checks on this machine before anything is packed, so offloaded experts
(slot views, never packed) still match resident ones bit for bit.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def _packed_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` ``[out, in]`` in oneDNN's layout, for :func:`linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)


def keep_shape_only(module: nn.Module, name: str) -> None:
    """Replace parameter ``name`` by a meta tensor of its shape and dtype once a packed copy holds its values."""
    p = getattr(module, name)
    setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False))


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` for a plain or a packed weight."""
    return _packed_linear(x, w) if w.layout == torch._mkldnn else F.linear(x, w)


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


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight lives in oneDNN's layout; ``weight`` keeps only its shape (meta)."""

    packed: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_linear(x, self.packed, self.bias)


def prepack(model: nn.Module) -> int:
    """Pack the bf16 CPU weights of ``model``'s linear layers and resident experts in place.

    Skipped: weights shared with another module (a tied LM head) and those a module reads
    directly (listed in its ``keep_unpacked``, e.g. DeepSeek's ``kv_b_proj``). Returns how
    many weight matrices were packed.
    """
    from .moe import Experts

    weights = [p for p in model.parameters() if p.device.type == "cpu"]
    if not weights or not supported(weights[0].dtype):
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
    return n
