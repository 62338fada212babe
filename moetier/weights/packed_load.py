"""The pipelined loader: several reader threads, a pool of host buffers, copies that overlap reads.

Each thread takes one region at a time (a dense tensor or one expert) and reads it in large
chunks. A chunk goes one of two ways:

- on the CPU, when the stored dtype is the model's, straight into the target tensors (page-aligned
  memory of their own): cached bytes by a buffered read, the rest by O_DIRECT into the targets
  themselves, or through an aligned pool buffer where a target slice is not block-aligned;
- otherwise (CUDA, a dtype cast, checksum-only passes) into a pool buffer (pinned on CUDA), from
  which it is copied on with ``non_blocking`` copies on the thread's side stream; an event per
  buffer says when it may be read into again, so the next chunk's read overlaps this chunk's copy.

Checksums (CRC-32 of each region) are computed on the fly when asked for.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..errors import CheckpointError
from .checksum import crc32, mismatch
from .direct_io import ALIGN, FileReader, aligned_buffer, round_up

DEFAULT_CHUNK = 8 << 20
DEFAULT_THREADS = 4


@dataclass
class Buffer:
    """A pool buffer; ``event`` (CUDA) marks the end of the last device copy out of it."""

    data: torch.Tensor  # uint8 [n], aligned
    view: memoryview = field(init=False)
    event: Optional[torch.cuda.Event] = None
    pending: bool = False

    def __post_init__(self):
        self.view = memoryview(self.data.numpy())


class BufferPool:
    """A fixed set of aligned host buffers shared by the reader threads, allocated on first use."""

    def __init__(self, count: int, nbytes: int, pin: bool = False):
        self.nbytes, self.pin, self._left = round_up(nbytes), pin, count
        self._free: queue.Queue[Buffer] = queue.Queue()
        self._lock = threading.Lock()

    def get(self) -> Buffer:
        with self._lock:
            if self._free.empty() and self._left:
                self._left -= 1
                buf = Buffer(aligned_buffer(self.nbytes, self.pin))
                if self.pin:
                    buf.event = torch.cuda.Event()
                return buf
        buf = self._free.get()
        if buf.pending:  # the device copy out of this buffer must finish before we overwrite it
            buf.event.synchronize()
            buf.pending = False
        return buf

    def put(self, buf: Buffer) -> None:
        self._free.put(buf)


@dataclass
class Segment:
    """Where a byte range of a region goes: ``dst`` (flat, any device/dtype) holds region bytes
    ``[start, start + nbytes)`` stored as ``src_dtype``."""

    start: int
    nbytes: int
    dst: torch.Tensor
    src_dtype: torch.dtype
    host_bytes: Optional[memoryview] = None  # dst's own bytes when it can be read into directly

    def __post_init__(self):
        if self.dst.device.type == "cpu" and self.dst.dtype == self.src_dtype:
            self.host_bytes = memoryview(self.dst.view(torch.uint8).numpy())

    @property
    def end(self) -> int:
        return self.start + self.nbytes


@dataclass
class Job:
    """One region to read: ``region`` needs ``path``, ``offset``, ``nbytes``, ``checksum`` and ``what``."""

    region: object
    segments: list[Segment]


@dataclass
class _Span:
    """A view onto region bytes from ``start``: a target's own memory (``addr`` its address), or
    scratch standing in for the padding between two parts (``addr`` None)."""

    start: int
    view: memoryview
    addr: Optional[int]

    def tail(self, frm: int) -> "_Span":
        k = max(0, frm - self.start)
        return _Span(self.start + k, self.view[k:], None if self.addr is None else self.addr + k)


def _spans(segments: Sequence[Segment], lo: int, hi: int) -> list[_Span]:
    """Spans covering region bytes ``[lo, hi)`` in order, so one vectored read fills them all."""
    out, pos = [], lo
    for s in segments:
        a, b = max(s.start, lo), min(s.end, hi)
        if a >= b:
            continue
        if a > pos:
            out.append(_Span(pos, memoryview(bytearray(a - pos)), None))
        out.append(_Span(a, s.host_bytes[a - s.start : b - s.start], s.dst.data_ptr() + (a - s.start)))
        pos = b
    if pos < hi:
        out.append(_Span(pos, memoryview(bytearray(hi - pos)), None))
    return out


def _aligned_prefix(spans: Sequence[_Span]) -> list[memoryview]:
    """The leading target views O_DIRECT can fill in place: aligned start, whole blocks."""
    out = []
    for sp in spans:
        if sp.addr is None or sp.addr % ALIGN:
            break
        n = len(sp.view) - len(sp.view) % ALIGN
        if n:
            out.append(sp.view[:n])
        if n < len(sp.view):
            break
    return out


def _scatter(buf: torch.Tensor, lo: int, length: int, segments: Sequence[Segment], non_blocking: bool) -> None:
    """Copy region bytes ``[lo, lo + length)``, held in ``buf[:length]``, into the segments' targets."""
    hi = lo + length
    for s in segments:
        a, b = max(s.start, lo), min(s.end, hi)
        if a >= b:
            continue
        src = buf[a - lo : b - lo].view(s.src_dtype)
        first = (a - s.start) // src.element_size()
        dst = s.dst[first : first + src.numel()]
        if dst.device.type != "cpu" and dst.dtype != src.dtype:
            src = src.to(dst.device, non_blocking=non_blocking)  # cast on the device, not on the host
        dst.copy_(src, non_blocking=non_blocking)


class Pipeline:
    """Read many regions with several threads into their targets, checking sizes (always) and
    checksums (when ``verify``)."""

    def __init__(self, reader: FileReader, device: torch.device, *, threads: int = DEFAULT_THREADS,
                 chunk_bytes: int = DEFAULT_CHUNK, verify: bool = False,
                 on_bytes: Optional[Callable[[int], None]] = None):
        self.reader, self.device, self.verify, self.on_bytes = reader, device, verify, on_bytes
        self.threads = max(1, threads)
        self.chunk = max(ALIGN, round_up(chunk_bytes))
        self.cuda = device.type == "cuda"
        self.pool = BufferPool(2 * self.threads, self.chunk, pin=self.cuda)
        self._progress_lock = threading.Lock()

    def run(self, jobs: Sequence[Job], collect_errors: bool = False) -> list[CheckpointError]:
        """Load every job; raise the first error, or with ``collect_errors`` return all of them."""
        jobs = [j for j in jobs if j.region.nbytes]
        it, lock, stop = iter(jobs), threading.Lock(), threading.Event()
        errors: list[CheckpointError] = []

        current = torch.cuda.current_stream(self.device) if self.cuda else None

        def worker() -> None:
            stream = None
            if self.cuda:
                stream = torch.cuda.Stream(self.device)
                # the targets were just allocated on the current stream, whose queued work may
                # still use that memory: the side stream's copies must come after it
                stream.wait_stream(current)
            try:
                while not stop.is_set():
                    with lock:
                        job = next(it, None)
                    if job is None:
                        return
                    try:
                        self._load(job, stream)
                    except CheckpointError as e:
                        if not collect_errors:
                            raise
                        with lock:
                            errors.append(e)
            except BaseException:
                stop.set()  # the other threads stop at their next region
                raise
            finally:
                if stream is not None:
                    stream.synchronize()

        with ThreadPoolExecutor(min(self.threads, max(1, len(jobs))), thread_name_prefix="moetier-load") as ex:
            futures = [ex.submit(worker) for _ in range(min(self.threads, max(1, len(jobs))))]
        for f in futures:
            f.result()  # re-raise a worker's error here
        return errors

    def _progress(self, n: int) -> None:
        if self.on_bytes is not None:
            with self._progress_lock:
                self.on_bytes(n)

    def _load(self, job: Job, stream) -> None:
        r, segs = job.region, job.segments
        fill = bool(segs) and all(s.host_bytes is not None for s in segs)  # CPU, no cast: read into targets
        crc = 0
        for lo in range(0, r.nbytes, self.chunk):
            length = min(self.chunk, r.nbytes - lo)
            if fill:
                spans = _spans(segs, lo, lo + length)
                self._fill(r, segs, spans, lo, length)
                if self.verify:
                    for sp in spans:
                        crc = crc32(sp.view, crc)
            else:
                buf = self.pool.get()
                try:
                    self.reader.read(r.path, r.offset + lo, buf.data, length, r.what)
                    if self.verify:
                        crc = crc32(buf.view[:length], crc)
                    if segs:
                        if stream is not None:
                            with torch.cuda.stream(stream):
                                _scatter(buf.data, lo, length, segs, non_blocking=True)
                            buf.event.record(stream)
                            buf.pending = True
                        else:
                            _scatter(buf.data, lo, length, segs, non_blocking=False)
                finally:
                    self.pool.put(buf)
            self._progress(length)
        if self.verify and crc != r.checksum:
            raise mismatch(r, crc)

    def _fill(self, r, segs: Sequence[Segment], spans: list[_Span], lo: int, length: int) -> None:
        """CPU, same dtype: fill the targets of region bytes ``[lo, lo + length)`` in place.

        Cached bytes by a buffered read; then O_DIRECT straight into the targets as far as their
        memory is block-aligned (it is for real model shapes: targets are page-aligned); what is
        left (small tails, tiny models) by O_DIRECT into a pool buffer and a copy, or, where the
        filesystem refuses O_DIRECT, by buffered reads.
        """
        end = lo + length
        got = lo + self.reader.read_cached(r.path, r.offset + lo, [sp.view for sp in spans], r.what)
        if got < end and self.reader.uses_direct(r.path, r.what):
            iov = _aligned_prefix([sp.tail(got) for sp in spans if sp.start + len(sp.view) > got])
            got += self.reader.read_direct(r.path, r.offset + got, iov, r.what)
        if got >= end:
            return
        if not self.reader.uses_direct(r.path, r.what):
            rest = [sp.tail(got).view for sp in spans if sp.start + len(sp.view) > got]
            self.reader.read_into(r.path, r.offset + got, rest, r.what)
            return
        buf = self.pool.get()
        try:
            self.reader.read(r.path, r.offset + got, buf.data, end - got, r.what, cached=False)
            _scatter(buf.data, got, end - got, segs, non_blocking=False)
            for sp in spans:  # the padding between parts, for the checksum
                a, b = max(sp.start, got), sp.start + len(sp.view)
                if sp.addr is None and a < b:
                    sp.view[a - sp.start :] = buf.view[a - got : b - got]
        finally:
            self.pool.put(buf)
