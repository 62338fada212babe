"""Where loaded weights live: one kind of storage, whichever file a weight came from."""

from __future__ import annotations

import torch

from .direct_io import empty_aligned


def weight_storage(shape, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised storage for one weight, the same whichever file it is read from.

    On the CPU every weight gets page-aligned memory of its own, as the packed loader's
    O_DIRECT reads need: a weight read from a safetensors folder would otherwise be a view of
    the file's mapping at whatever offset its header left (often 8 mod 64), and some CPUs'
    GEMM kernels sum in another order for an unaligned operand — so a model loaded from its
    HF folder would not match itself loaded from the packed format, bit for bit.
    """
    if device.type == "cpu":
        return empty_aligned(shape, dtype)
    return torch.empty(shape, device=device, dtype=dtype)
