"""Per-sequence KV storage.

Each sequence owns one :class:`SeqKV`. Attention modules store whatever their
layer needs (keys and values for GQA; the compressed latent for MLA) as a
tuple of buffers shaped ``[heads, capacity, dim]`` so that the live prefix
``[:, :length]`` is a view, never a copy.
"""

from __future__ import annotations

import torch


class SeqKV:
    """KV buffers of one sequence across all layers; grows by doubling."""

    def __init__(self, num_layers: int, capacity: int, device: torch.device | str, dtype: torch.dtype):
        self.capacity = max(int(capacity), 1)
        self.device = torch.device(device)
        self.dtype = dtype
        self.length = 0  # tokens committed (visible to later steps)
        self._layers: list[tuple[torch.Tensor, ...] | None] = [None] * num_layers

    def write(self, layer: int, start: int, *parts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store ``parts`` (each ``[heads, n, dim]``) at ``start`` and return views of ``[:start+n]``."""
        n = parts[0].shape[1]
        end = start + n
        bufs = self._layers[layer]
        if bufs is None or end > bufs[0].shape[1]:
            bufs = self._grow(bufs, parts, end)
            self._layers[layer] = bufs
        for buf, part in zip(bufs, parts):
            buf[:, start:end].copy_(part)
        return tuple(buf[:, :end] for buf in bufs)

    def _grow(self, old, parts, need: int):
        cap = self.capacity
        while cap < need:
            cap *= 2
        self.capacity = cap
        bufs = tuple(
            torch.empty((p.shape[0], cap, p.shape[2]), dtype=self.dtype, device=self.device) for p in parts
        )
        if old is not None:
            for new, prev in zip(bufs, old):
                new[:, : prev.shape[1]].copy_(prev)
        return bufs

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for bufs in self._layers if bufs for b in bufs)
