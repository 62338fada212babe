"""The host tier: experts kept in (pinned) host memory between the disk and the device slots.

On a GPU the device holds few experts and the host many: a device miss that the host
tier holds costs one PCIe copy instead of a disk read. Slots are 4 KiB-aligned (disk
reads go straight in with O_DIRECT) and, on CUDA, pinned (the copy to the device is a
DMA). The pool is an anonymous mapping of exactly its size, registered with CUDA,
rather than torch's pinned allocator, which rounds every allocation up to a power of
two (a 48 GiB tier would pin 64 GiB) and keeps freed blocks cached. Replacement is least-recently-used: the device cache above already filters the
hot experts, so what reaches the host tier is the long tail, where recency is as good
a guide as any.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import Counter, OrderedDict
from contextlib import contextmanager
from typing import Iterator

import torch

from .cache import Key

log = logging.getLogger(__name__)


class HostTier:
    """``num_slots`` expert slots in host memory, filled from ``source`` on a miss."""

    def __init__(self, source, num_slots: int, pin: bool):
        from ..weights.direct_io import aligned_buffer

        self.source = source
        self.layout = source.layout
        self.num_slots = num_slots
        self.pool = aligned_buffer(num_slots * self.layout.slot_bytes).view(num_slots, -1)
        # unpinned on close(), or when the tier is collected without one (before its mapping goes)
        self._unpin = weakref.finalize(self, _unregister, self.pool.data_ptr()) if pin and _register(self.pool) \
            else None
        self._slot_of: OrderedDict[Key, int] = OrderedDict()  # experts held, least recently used first
        self._free = list(range(num_slots - 1, -1, -1))
        self._busy: Counter[int] = Counter()  # slots being filled or copied from: never evicted
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self.pool.numel()

    def close(self) -> None:
        """Unpin the pool (the store calls this once no load is in flight)."""
        if self._unpin is not None:
            self._unpin()

    def holds(self, key: Key) -> bool:
        with self._lock:
            return key in self._slot_of

    @contextmanager
    def hold(self, key: Key) -> Iterator[tuple[torch.Tensor, bool]]:
        """``(slot buffer holding key's region, whether it came from disk)``, kept until exit.

        The caller (the device store) never asks for one key from two threads at once.
        """
        with self._lock:
            slot = self._slot_of.get(key)
            hit = slot is not None
            if hit:
                self._slot_of.move_to_end(key)
            else:
                slot = self._claim()
            self._busy[slot] += 1
        try:
            if not hit:
                try:
                    self.source.read_into(key[0], key[1], self.pool[slot])
                except BaseException:
                    with self._lock:
                        self._free.append(slot)
                    raise
                with self._lock:
                    self._slot_of[key] = slot
            yield self.pool[slot], not hit
        finally:
            with self._lock:
                self._busy[slot] -= 1

    def _claim(self) -> int:
        """A free slot, or the least recently used idle one's (lock held)."""
        if self._free:
            return self._free.pop()
        for key, slot in self._slot_of.items():
            if not self._busy[slot]:
                del self._slot_of[key]
                return slot
        raise RuntimeError(f"the host tier's {self.num_slots} slots are all being read; give it more memory")


def _register(buf: torch.Tensor) -> bool:
    """Pin ``buf`` for DMA to the GPU; False (and a warning: copies are then staged) if CUDA refuses."""
    rc = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0))
    if rc != 0:
        log.warning("could not pin the %d-byte host tier (cudaError %d); its copies to the GPU will be slower",
                    buf.numel(), rc)
    return rc == 0


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)
