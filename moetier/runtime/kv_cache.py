"""KV storage: one :class:`SeqKV` per sequence, optionally a row of a shared :class:`KVPool`.

Attention modules store whatever their layer needs (keys and values for GQA; the
compressed latent for MLA) as a tuple of buffers shaped ``[heads, capacity, dim]`` so
that the live prefix ``[:, :length]`` is a view, never a copy.

A pool holds the buffers of many sequences in one tensor per layer and part,
``[slots, heads, capacity, dim]``: a sequence's buffers are its row, so the same
``SeqKV`` code reads and writes them, and sequences that each add one token attend
together straight on the pool (``models/layers.py``) instead of on padded copies of
their caches. The throughput runner uses one, where every sequence's reservation is
known up front.

Bounded layers (a sliding window, a chunk) keep a ring of at most their limit of positions
(:meth:`SeqKV.write_window`, :meth:`SeqKV.write_chunked`). Layers that keep a fixed-size state
instead (``runtime/cache_spec.py``: a gated DeltaNet layer's conv window and recurrent state) get it
from :meth:`SeqKV.state`, a pool's state rows
``[slots, *shape]`` beside its KV rows; a state is never grown, and a sequence's first step
(``start == 0``) overwrites it rather than reading it, so a reused row needs no clearing.
"""

from __future__ import annotations

from typing import Optional

import torch


class KVPool:
    """KV buffers of up to ``slots`` sequences of up to ``capacity`` tokens, allocated per layer
    on first use (zeroed: attention over a row's unused tail must read finite numbers)."""

    def __init__(self, num_layers: int, slots: int, capacity: int, device: torch.device | str, dtype: torch.dtype):
        self.slots = int(slots)
        self.capacity = int(capacity)
        self.device = torch.device(device)
        self.dtype = dtype
        self.layers: list[tuple[torch.Tensor, ...] | None] = [None] * num_layers
        self.states: list[tuple[torch.Tensor, ...] | None] = [None] * num_layers  # [slots, *shape] per part
        self._free = list(range(self.slots - 1, -1, -1))  # pop() gives the lowest free slot

    def take(self) -> "SeqKV":
        """A cache for one more sequence, in the lowest free slot."""
        if not self._free:
            raise RuntimeError(f"all {self.slots} KV pool slots are taken")
        slot = self._free.pop()
        return SeqKV(len(self.layers), self.capacity, self.device, self.dtype, pool=self, slot=slot)

    def give_back(self, slot: int) -> None:
        """Free ``slot`` (through :meth:`SeqKV.release`); its old contents stay until it is written over."""
        self._free.append(slot)
        self._free.sort(reverse=True)

    def layer(self, layer: int, parts: tuple[torch.Tensor, ...], capacity: Optional[int] = None) -> tuple[torch.Tensor, ...]:
        """The pool's buffers of ``layer`` (``[slots, heads, capacity, dim]`` per part), shaped like ``parts``;
        ``capacity`` (a bounded layer's ring, :meth:`SeqKV.write_window` / ``write_chunked``) overrides the pool's."""
        bufs = self.layers[layer]
        if bufs is None:
            cap = self.capacity if capacity is None else int(capacity)
            bufs = tuple(torch.zeros((self.slots, p.shape[0], cap, p.shape[2]), dtype=self.dtype,
                                     device=self.device) for p in parts)
            self.layers[layer] = bufs
        return bufs

    def state(self, layer: int, shapes) -> tuple[torch.Tensor, ...]:
        """The pool's state rows of ``layer``: ``[slots, *shape]`` per ``(shape, dtype)`` of ``shapes``."""
        bufs = self.states[layer]
        if bufs is None:
            bufs = self.states[layer] = _zeros(shapes, self.device, (self.slots,))
        return bufs

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for part in (self.layers, self.states) for bufs in part if bufs
                   for b in bufs)


def _zeros(shapes, device, lead: tuple = ()) -> tuple[torch.Tensor, ...]:
    return tuple(torch.zeros(lead + tuple(s), dtype=d, device=device) for s, d in shapes)


class SeqKV:
    """KV buffers of one sequence across all layers; grows by doubling (out of its pool row, if it has one)."""

    def __init__(self, num_layers: int, capacity: int, device: torch.device | str, dtype: torch.dtype,
                 pool: Optional[KVPool] = None, slot: int = -1):
        self.capacity = max(int(capacity), 1)
        self.device = torch.device(device)
        self.dtype = dtype
        self.length = 0  # tokens committed (visible to later steps)
        self.pool, self.slot = pool, slot
        self._outgrown: set[int] = set()  # layers whose buffers had to leave the pool row
        self._layers: list[tuple[torch.Tensor, ...] | None] = [None] * num_layers
        self._states: dict[int, tuple[torch.Tensor, ...]] = {}  # layer -> its fixed-size state

    def state(self, layer: int, shapes) -> tuple[torch.Tensor, ...]:
        """``layer``'s fixed-size state (``(shape, dtype)`` per tensor of ``shapes``), this sequence's
        pool row or its own, allocated zeroed on first use. Updated in place by the layer."""
        bufs = self._states.get(layer)
        if bufs is None:
            if self.pool is not None:
                bufs = tuple(b[self.slot] for b in self.pool.state(layer, shapes))
            else:
                bufs = _zeros(shapes, self.device)
            self._states[layer] = bufs
        return bufs

    def pooled(self, layer: int) -> bool:
        """Whether ``layer``'s buffers are this sequence's row of its pool (not grown out of it)."""
        return self.pool is not None and layer not in self._outgrown

    def write(self, layer: int, start: int, *parts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store ``parts`` (each ``[heads, n, dim]``) at ``start`` and return views of ``[:start+n]``."""
        end = start + parts[0].shape[1]
        bufs = self.reserve(layer, end, parts)
        for buf, part in zip(bufs, parts):
            buf[:, start:end].copy_(part)
        return tuple(buf[:, :end] for buf in bufs)

    def reserve(self, layer: int, end: int, parts) -> tuple[torch.Tensor, ...]:
        """``layer``'s whole buffers (each ``[heads, capacity, dim]``, contiguous), grown to hold ``end`` tokens;
        ``parts`` give the heads and dims (tensors shaped like what is stored; meta tensors will do)."""
        bufs = self._layers[layer]
        if bufs is None and self.pool is not None:
            bufs = self._layers[layer] = tuple(b[self.slot] for b in self.pool.layer(layer, parts))
        if bufs is None or end > bufs[0].shape[1]:
            bufs = self._grow(bufs, parts, end)
            self._layers[layer] = bufs
            self._outgrown.add(layer)
        return bufs

    def write_window(self, layer: int, start: int, window: int, *parts: torch.Tensor):
        """A sliding-window layer's cache: a ring of ``window`` positions (position ``p`` in slot
        ``p % window``), never more, however long the sequence.

        Stores ``parts`` (each ``[heads, n, dim]``, positions ``start..start+n-1``) and returns
        ``(views, first)``: the keys a query of this step can see. For one new token (decode) they are
        the ring's filled slots as they lie (``first`` None: every one is inside the window, in ring
        order); for several, the previous ``window - 1`` positions and the new ones in position order,
        ``first`` being the position of the first. Until the ring is full, position ``p`` is slot ``p``, so
        the buffers start small and grow (:meth:`_ring`): a sequence shorter than the window holds its length."""
        n = parts[0].shape[1]
        bufs = self._ring(layer, window, parts, need=min(start + n, window))
        if n == 1:
            for buf, part in zip(bufs, parts):
                buf[:, start % window].copy_(part[:, 0])
            return tuple(buf[:, : min(start + 1, window)] for buf in bufs), None
        first = max(0, start - window + 1)
        old = torch.arange(first, start, device=self.device) % window
        views = tuple(torch.cat((buf[:, old], part), dim=1) for buf, part in zip(bufs, parts))
        keep = min(n, window)  # only the last window positions stay
        slots = torch.arange(start + n - keep, start + n, device=self.device) % window
        for buf, part in zip(bufs, parts):
            buf[:, slots] = part[:, n - keep :]
        return views, first

    def write_chunked(self, layer: int, start: int, chunk: int, *parts: torch.Tensor):
        """A chunked-attention layer's cache (Llama 4): a ring of ``chunk`` positions, position ``p`` in
        slot ``p % chunk``, since a query sees only the keys of its own chunk. Stores ``parts`` (positions
        ``start..start+n-1``) and returns ``(views, first)``: the current chunk's earlier keys and the new
        ones, in position order, ``first`` being the position of the first."""
        n = parts[0].shape[1]
        first, have = (start // chunk) * chunk, start % chunk
        bufs = self._ring(layer, chunk, parts, need=chunk if have + n > chunk else have + n)
        if n == 1:
            for buf, part in zip(bufs, parts):
                buf[:, have].copy_(part[:, 0])
            return tuple(buf[:, : have + 1] for buf in bufs), first
        views = tuple(torch.cat((buf[:, :have], part), dim=1) for buf, part in zip(bufs, parts))
        keep = min(n, chunk)
        slots = torch.arange(start + n - keep, start + n, device=self.device) % chunk
        for buf, part in zip(bufs, parts):
            buf[:, slots] = part[:, n - keep :]
        return views, first

    def _ring(self, layer: int, size: int, parts, need: Optional[int] = None) -> tuple[torch.Tensor, ...]:
        """``layer``'s ring buffers of ``size`` positions (each ``[heads, size, dim]``), made on first use.
        With ``need``, the buffers start smaller (the pool's rows, ``min(size, capacity)``: what the memory
        accounting reserves per row, ``runtime/cache_spec.py``; or ``need``) and grow by doubling, never past
        ``size``, to hold slots ``0..need-1`` (a window or chunk of 8192 positions is not taken at once)."""
        bufs = self._layers[layer]
        if bufs is None and self.pool is not None:
            cap = size if need is None else min(size, self.pool.capacity)
            bufs = tuple(b[self.slot] for b in self.pool.layer(layer, parts, capacity=cap))
        elif bufs is None and need is None:
            bufs = tuple(torch.zeros((p.shape[0], size, p.shape[2]), dtype=self.dtype, device=self.device)
                         for p in parts)
        if need is not None and (bufs is None or bufs[0].shape[1] < need):
            cap = bufs[0].shape[1] if bufs is not None else 1
            cap = min(size, max(need, 2 * cap))
            new = tuple(torch.zeros((p.shape[0], cap, p.shape[2]), dtype=self.dtype, device=self.device)
                        for p in parts)
            for n_buf, o_buf in zip(new, bufs or ()):
                n_buf[:, : o_buf.shape[1]].copy_(o_buf)
            bufs = new
            self._outgrown.add(layer)
        self._layers[layer] = bufs
        return bufs

    def positions_held(self, layer: int) -> int:
        """How many positions ``layer``'s buffers can hold (tests: a sliding-window layer holds its window)."""
        bufs = self._layers[layer]
        return 0 if bufs is None else bufs[0].shape[1]

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

    def release(self) -> None:
        """Give the pool row back (a private cache is simply dropped with the object)."""
        if self.pool is not None:
            self.pool.give_back(self.slot)
            self.pool = None
        self._layers = [None] * len(self._layers)
        self._states = {}

    def nbytes(self) -> int:
        """Bytes of this sequence's own buffers (a pool row counts in the pool)."""
        kv = sum(b.numel() * b.element_size() for i, bufs in enumerate(self._layers)
                 if bufs and not self.pooled(i) for b in bufs)
        if self.pool is not None:
            return kv
        return kv + sum(b.numel() * b.element_size() for bufs in self._states.values() for b in bufs)
