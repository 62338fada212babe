"""The expert store: the only code that moves expert bytes.

Experts rest in a source (the packed checkpoint on disk, or host memory) and
are brought into a fixed pool of slots on the compute device. A slot holds one
expert as raw bytes laid out like its source region (``gate_up`` ``[2I, H]``
then ``down`` ``[H, I]``), so a load is one read (or one copy) and the tensors
the math sees are views of the slot: the same shapes and strides as resident
weights, hence bit-identical results.

Loads run on a thread pool (disk reads and host->device copies release the
GIL); on CUDA the copy goes from pinned host memory on a side stream and the
compute stream waits on an event before using the slot. With a host tier
(``host_slots``) a load goes disk -> host tier -> slot and a device miss the
host tier holds reads nothing from disk; without one, each load is read into
the slot directly (CPU) or through a pinned staging buffer (CUDA).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol

import torch

from .cache import Key, Policy
from .host_tier import HostTier

ALIGN = 4096


@dataclass(frozen=True)
class ExpertLayout:
    """Shapes and dtype of one expert, and where its two tensors sit in a region."""

    gate_up: tuple[int, int]  # [2I, H]
    down: tuple[int, int]  # [H, I]
    dtype: torch.dtype
    down_offset: int  # bytes from the region start to the down rows

    @property
    def nbytes(self) -> int:
        return self.down_offset + self.down[0] * self.down[1] * self.dtype.itemsize

    @property
    def slot_bytes(self) -> int:
        return -(-self.nbytes // ALIGN) * ALIGN

    def views(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up, down)`` tensors viewing a uint8 region ``buf``."""
        gu_n = self.gate_up[0] * self.gate_up[1] * self.dtype.itemsize
        d_n = self.down[0] * self.down[1] * self.dtype.itemsize
        gu = buf[:gu_n].view(self.dtype).view(self.gate_up)
        dn = buf[self.down_offset : self.down_offset + d_n].view(self.dtype).view(self.down)
        return gu, dn


class ExpertSource(Protocol):
    """Where experts rest. ``read_into`` fills a uint8 CPU tensor with one expert's region."""

    layout: ExpertLayout

    def read_into(self, layer: int, expert: int, out: torch.Tensor) -> None: ...


@dataclass
class StoreStats:
    """Counters since the last reset; ``as_dict`` is what ``llm.stats()`` reports."""

    hits: int = 0  # requested and already resident
    misses: int = 0  # requested and not resident (includes waiting on a prefetch still in flight)
    prefetch_hits: int = 0  # requested, resident, and brought in by a prefetch
    prefetch_late: int = 0  # requested while its prefetch was still in flight
    prefetched: int = 0  # loads started by the prefetcher
    wasted_prefetches: int = 0  # prefetched experts evicted before any use
    evictions: int = 0
    host_hits: int = 0  # misses in the device slots that the host tier held (no disk read)
    bytes_disk_to_host: int = 0
    bytes_host_to_device: int = 0
    stall_s: float = 0.0  # time the forward pass waited for experts
    per_tier: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        requests = self.hits + self.misses
        d = {k: v for k, v in self.__dict__.items() if k != "per_tier"}
        d["hit_rate"] = round(self.hits / requests, 4) if requests else None
        d["stall_s"] = round(self.stall_s, 4)
        return d


class ExpertStore:
    """A pool of ``num_slots`` expert slots on ``device``, filled from ``source`` on demand.

    ``acquire(layer, experts)`` returns the experts' tensors, loading misses and
    pinning them until ``release(layer)``; ``prefetch(keys)`` starts loads ahead
    of need and protects them from eviction until they are used or
    ``end_step`` clears the protection.
    """

    def __init__(self, source: ExpertSource, num_slots: int, policy: Policy, device: torch.device | str = "cpu",
                 threads: int = 4, host_slots: int = 0):
        self.source = source
        self.layout = source.layout
        self.device = torch.device(device)
        self.policy = policy
        self.num_slots = num_slots
        self.slot_bytes = self.layout.slot_bytes
        self._alloc(num_slots)
        self.host: Optional[HostTier] = None  # experts in host memory between the source and the slots
        if host_slots:
            if host_slots < threads:
                raise ValueError(f"a host tier needs at least {threads} slots (one per loader thread), "
                                 f"got {host_slots}")
            self.host = HostTier(source, host_slots, pin=self.device.type == "cuda")
        self._lock = threading.Lock()
        self._slot_of: dict[Key, int] = {}  # resident or loading
        self._loading: dict[Key, Future] = {}
        self._free = list(range(num_slots - 1, -1, -1))
        self._in_use: set[Key] = set()
        self._protected: set[Key] = set()
        self._from_prefetch: set[Key] = set()
        self._pool_exec = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moetier-expert")
        self.stats = StoreStats()
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            self._stream = torch.cuda.Stream(self.device)
            self._staging = threading.local()
            self._events: dict[Key, torch.cuda.Event] = {}
            self._released: Optional[torch.cuda.Event] = None  # compute finished with released slots

    def _alloc(self, num_slots: int) -> None:
        if self.device.type == "cpu":  # page-aligned, so disk reads can go straight into a slot (O_DIRECT)
            from ..weights.direct_io import aligned_buffer

            self._pool = aligned_buffer(num_slots * self.slot_bytes).view(num_slots, self.slot_bytes)
        else:
            self._pool = torch.empty((num_slots, self.slot_bytes), dtype=torch.uint8, device=self.device)
        self._views = [self.layout.views(self._pool[i]) for i in range(num_slots)]

    def resize(self, num_slots: int) -> None:
        """Replace the pool by an empty one of ``num_slots`` slots (a runner that plans its own
        memory split, e.g. throughput mode trading expert slots for KV cache). No layer may hold
        experts; loads in flight are waited for; the old pool is freed before the new one exists."""
        with self._lock:
            if self._in_use:
                raise RuntimeError("cannot resize the expert store while a layer holds experts")
            pending = list(self._loading.values())
        wait(pending)
        with self._lock:
            for k in self._slot_of:
                self.policy.forget(k)
            self._slot_of.clear()
            self._loading.clear()
            self._protected.clear()
            self._from_prefetch.clear()
            if self._cuda:
                self._events.clear()
                self._released = None
            self._pool = self._views = None
            self._alloc(num_slots)
            self.num_slots = num_slots
            self._free = list(range(num_slots - 1, -1, -1))

    @property
    def nbytes(self) -> int:
        """Bytes the store holds on its device (its whole slot pool)."""
        return self._pool.numel()

    def resident(self) -> set[Key]:
        with self._lock:
            return {k for k in self._slot_of if k not in self._loading}

    # -- loading ----------------------------------------------------------------------------------

    def _load(self, key: Key, slot: int) -> None:
        """Worker thread: bring ``key`` into ``slot``."""
        n = self.layout.nbytes
        if self.host is not None:  # disk -> host tier (on a host miss) -> device slot
            with self.host.hold(key) as (src, from_disk):
                if from_disk:
                    self._count("bytes_disk_to_host", n)
                else:
                    self._count("host_hits", 1)
                self._to_device(key, slot, src)
            return
        if not self._cuda:  # the whole (4 KiB-rounded) slot: one O_DIRECT read, no buffered tail
            self.source.read_into(key[0], key[1], self._pool[slot])
            self._count("bytes_disk_to_host", n)
            return
        staging = getattr(self._staging, "buf", None)
        if staging is None:
            from ..weights.direct_io import aligned_buffer

            staging = self._staging.buf = aligned_buffer(self.slot_bytes, pin=True)
        self.source.read_into(key[0], key[1], staging)
        self._count("bytes_disk_to_host", n)
        self._to_device(key, slot, staging)

    def _count(self, counter: str, n: int) -> None:
        """Add to a stats counter from a loader thread (several run at once)."""
        with self._lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + n)

    def _to_device(self, key: Key, slot: int, src: torch.Tensor) -> None:
        """Copy one expert's region from host buffer ``src`` into ``slot``; returns once ``src`` is free again."""
        n = self.layout.nbytes
        if not self._cuda:
            self._pool[slot, :n].copy_(src[:n])
        else:
            with torch.cuda.stream(self._stream):
                if self._released is not None:  # the slot's previous expert may still be read by compute
                    self._stream.wait_event(self._released)
                self._pool[slot, :n].copy_(src[:n], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self._stream)
            ev.synchronize()  # src (staging or a host-tier slot) may be reused once this returns
            self._events[key] = ev
        self._count("bytes_host_to_device", n)

    def _start(self, key: Key, layer: int, prefetch: bool) -> Optional[Future]:
        """Claim a slot for ``key`` and start loading it (lock held). None if no slot can be freed.

        A prefetch may only evict experts that are neither in use nor protected; a demand load
        may also evict protected ones (a prediction must never block the layer that runs now).
        """
        if self._free:
            slot = self._free.pop()
        else:
            movable = [k for k in self._slot_of if k not in self._in_use and k not in self._loading]
            candidates = [k for k in movable if k not in self._protected] or ([] if prefetch else movable)
            if not candidates:
                return None
            victim = self.policy.victim(candidates, layer)
            slot = self._slot_of.pop(victim)
            self._protected.discard(victim)
            self.policy.forget(victim)
            self.stats.evictions += 1
            if victim in self._from_prefetch:
                self._from_prefetch.discard(victim)
                self.stats.wasted_prefetches += 1
        self._slot_of[key] = slot
        fut = self._pool_exec.submit(self._run_load, key, slot)
        self._loading[key] = fut
        if prefetch:
            self._from_prefetch.add(key)
            self.stats.prefetched += 1
        return fut

    def _run_load(self, key: Key, slot: int) -> None:
        """Worker thread: load, then publish the result before the future completes."""
        try:
            self._load(key, slot)
        except BaseException:
            with self._lock:  # forget the slot's claim; acquire() re-raises the error
                self._loading.pop(key, None)
                if self._slot_of.pop(key, None) is not None:
                    self._free.append(slot)
                self._from_prefetch.discard(key)
            raise
        with self._lock:
            self._loading.pop(key, None)

    # -- the forward pass's side ----------------------------------------------------------------

    def acquire(self, layer: int, experts: Iterable[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Tensors of ``experts`` of ``layer``, all resident; they stay put until ``release(layer)``."""
        keys = [(layer, e) for e in experts]
        waits: list[Future] = []
        missing: list[Key] = []
        with self._lock:
            for k in keys:
                self._in_use.add(k)
                if k in self._slot_of and k not in self._loading:
                    self.stats.hits += 1
                    self.stats.prefetch_hits += k in self._from_prefetch
                else:
                    self.stats.misses += 1
                    if k in self._loading:
                        self.stats.prefetch_late += k in self._from_prefetch
                        waits.append(self._loading[k])
                    else:
                        missing.append(k)
                self._from_prefetch.discard(k)
                self._protected.discard(k)
                self.policy.touch(k)
        t0 = time.perf_counter()
        try:
            while missing:
                with self._lock:
                    fut = self._start(missing[0], layer, prefetch=False)
                    if fut is not None:
                        waits.append(fut)
                        missing.pop(0)
                        continue
                    # every other slot is mid-load: wait for one (a prefetch first) and evict it then
                    busy = sorted(self._loading.items(), key=lambda kv: kv[0] in self._in_use)
                    if not busy:
                        raise RuntimeError(f"expert store has {self.num_slots} slots, too few for the "
                                           f"{len(keys)} experts layer {layer} needs")
                    blocker = busy[0][1]
                wait([blocker])
            for fut in waits:
                fut.result()  # re-raises a read error (a CheckpointError: corrupt or short) in this thread
        except BaseException:
            with self._lock:  # no release() follows a failed acquire: unpin, so the slots can be reused
                self._in_use.difference_update(keys)
            raise
        if waits:
            self.stats.stall_s += time.perf_counter() - t0
        out = {}
        for k in keys:
            slot = self._slot_of[k]
            if self._cuda and k in self._events:
                torch.cuda.current_stream(self.device).wait_event(self._events.pop(k))
            out[k[1]] = self._views[slot]
        return out

    def release(self, layer: int) -> None:
        if self._cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._released = ev
        with self._lock:
            self._in_use = {k for k in self._in_use if k[0] != layer}

    def prefetch(self, keys: Iterable[Key], layer: int) -> int:
        """Start loading ``keys`` (most urgent first) that are neither resident nor loading.

        Stops at the first key no slot can be freed for; returns how many loads started.
        """
        started = 0
        with self._lock:
            for k in keys:
                if k in self._slot_of:
                    self._protected.add(k)
                    continue
                if self._start(k, layer, prefetch=True) is None:
                    break
                self._protected.add(k)
                started += 1
        return started

    def end_step(self) -> None:
        """Drop prefetch protection at the end of a forward step (predictions are per step)."""
        with self._lock:
            self._protected.clear()

    def close(self) -> None:
        self._pool_exec.shutdown(wait=True, cancel_futures=True)
        if self.host is not None:
            self.host.close()
