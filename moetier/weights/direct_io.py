"""Reading exact byte ranges of weight files fast: O_DIRECT where the filesystem allows it, the
page cache where it already holds the bytes, ordinary buffered reads where neither applies.

O_DIRECT moves the bytes from the device straight into (aligned) user memory: no page-cache copy
and no readahead to compete with, which is what a cold load wants. It is tried per file and given
up for that file when the filesystem refuses it, at ``open`` (EINVAL: some tmpfs, FUSE, network
filesystems) or at the first read. Bytes the page cache already holds (``mincore`` tells, without
reading) are copied from it instead, so a warm load does not go back to the disk. Every read is
checked for length: a file cut short is an error naming the file and the tensor.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import math
import mmap
import os
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)

ALIGN = 4096  # region alignment in the files, and the O_DIRECT alignment of offsets, lengths and buffers


def _huge_page() -> int:
    try:  # 2 MiB on x86-64; other page sizes elsewhere
        return int(Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 2 << 20


HUGE_PAGE = _huge_page()


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def empty_aligned(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor on its own page-aligned memory, so O_DIRECT can read into it."""
    nbytes = math.prod(shape) * dtype.itemsize
    return aligned_buffer(nbytes)[:nbytes].view(dtype).view(tuple(shape))


def aligned_buffer(nbytes: int, pin: bool = False) -> torch.Tensor:
    """A uint8 host tensor of ``nbytes`` whose address is a multiple of ALIGN (O_DIRECT needs it).

    Unpinned buffers are private anonymous mmaps (page aligned; the tensor keeps the mapping
    alive); pinned ones are over-allocated by ALIGN and sliced to an aligned start. A buffer of a
    huge page or more starts on a huge-page boundary (the mapping over-allocated by one huge page:
    address space only, the pages never touched take no memory) and asks for transparent huge pages
    on its whole huge pages (``MADV_HUGEPAGE``, before anything touches it), where the kernel has
    them: the kernels read weights as long streams, and on 4 KiB pages every page is a TLB miss
    and a stop for the hardware prefetchers (decode reads weights ~8 % faster so on a Zen 4 VM).
    """
    nbytes = max(round_up(nbytes), ALIGN)
    if pin:
        raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=True)
        start = (-raw.data_ptr()) % ALIGN
        return raw[start : start + nbytes]
    huge = nbytes >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE")
    m = mmap.mmap(-1, nbytes + (HUGE_PAGE if huge else 0), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(m, dtype=torch.uint8)
    start = (-raw.data_ptr()) % HUGE_PAGE if huge else 0
    if huge:
        try:  # whole huge pages only: a short tail on huge pages would hold a mostly empty 2 MiB
            m.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
        except OSError:  # THP compiled out or refused: ordinary pages
            pass
    return raw[start : start + nbytes]


def _truncated(path: Path, what: str, offset: int, length: int) -> CheckpointError:
    try:
        size = f"the file ends at byte {os.path.getsize(path)}"
    except OSError:
        size = "the file is gone"
    return CheckpointError(f"{path}: truncated: {what} needs bytes {offset}..{offset + length} but {size}")


def _failed(path: Path, what: str, offset: int, length: int, e: OSError) -> CheckpointError:
    """A read the OS refused (EIO from a failing disk...): the file, the tensor and the bytes."""
    return CheckpointError(f"{path}: cannot read {what} (bytes {offset}..{offset + length}: {e})")


class PageCache:
    """Which pages of a file the page cache holds: ``mincore`` on a read-only mapping (never reads).

    Asking is what lets a warm load skip the disk: O_DIRECT always goes to the device, and a
    ``RWF_NOWAIT`` probe is no substitute since on a miss it starts readahead of the very range
    the O_DIRECT read then fetches a second time.
    """

    def __init__(self, fd: int):
        self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)  # raises on an empty file
        self._addr = np.frombuffer(self._map, dtype=np.uint8).ctypes.data
        self.size = len(self._map)

    def resident_prefix(self, offset: int, length: int) -> int:
        """How many bytes from ``offset`` (at most ``length``) are cached, counted in whole pages."""
        end = min(offset + length, self.size)
        if end <= offset:
            return 0
        page = mmap.PAGESIZE
        start = offset - offset % page
        pages = -(-(end - start) // page)
        vec = np.empty(pages, dtype=np.uint8)
        if _mincore(self._addr + start, end - start, vec.ctypes.data) != 0:
            return 0
        missing = np.flatnonzero((vec & 1) == 0)
        if not len(missing):
            return end - offset
        return max(0, start + int(missing[0]) * page - offset)

    def resident(self) -> int:
        """Bytes of the whole file the page cache holds, counted in whole pages (0 where unknown)."""
        page = mmap.PAGESIZE
        vec = np.empty(-(-self.size // page), dtype=np.uint8)
        if _mincore is None or _mincore(self._addr, self.size, vec.ctypes.data) != 0:
            return 0
        return min(self.size, int(np.count_nonzero(vec & 1)) * page)

    def close(self) -> None:
        self._map.close()


def _load_mincore():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_mincore = _load_mincore() if sys.platform.startswith("linux") else None


class _File:
    """One weight file: a buffered fd, an O_DIRECT fd (None where refused), its page-cache map."""

    def __init__(self, path: Path, what: str, direct: bool):
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: weight file is missing (it holds {what})") from None
        self.direct_fd: Optional[int] = None
        self._dropped: Optional[int] = None
        self.cache: Optional[PageCache] = None
        if direct:
            try:
                self.direct_fd = os.open(path, flags | os.O_DIRECT)
            except OSError as e:  # EINVAL on some filesystems (older tmpfs, FUSE...): page cache it is
                log.debug("O_DIRECT refused for %s (%s); using buffered reads", path, e)
        if self.direct_fd is not None:
            if _mincore is not None:
                try:
                    self.cache = PageCache(self.fd)
                except (OSError, ValueError):
                    self.cache = None
            # the buffered fd now only reads pages already cached: no readahead behind O_DIRECT's back
            _fadvise(self.fd, "POSIX_FADV_RANDOM")

    def drop_direct(self) -> None:
        # closed only in close(): another thread may be inside a read on it right now
        self._dropped, self.direct_fd = self.direct_fd, None
        _fadvise(self.fd, "POSIX_FADV_NORMAL")

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        for fd in (self.fd, self.direct_fd, self._dropped):
            if fd is not None:
                os.close(fd)


def _fadvise(fd: int, advice: str) -> None:
    if hasattr(os, "posix_fadvise") and hasattr(os, advice):
        try:
            os.posix_fadvise(fd, 0, 0, getattr(os, advice))
        except OSError:
            pass


def _skip(views: Sequence[memoryview], n: int) -> list[memoryview]:
    """The views after their first ``n`` bytes."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out


def _cut(views: Sequence[memoryview], n: int) -> list[memoryview]:
    """The first ``n`` bytes of a list of views."""
    out = []
    for v in views:
        if n <= 0:
            break
        out.append(v[:n])
        n -= len(v)
    return out


class FileReader:
    """Open the files of a packed folder (buffered, and O_DIRECT where allowed) and read exact ranges.

    Bytes the page cache holds are copied from it; the rest come by O_DIRECT in whole aligned
    blocks where the filesystem allows it, else by ordinary buffered reads.
    """

    def __init__(self, direct: bool = True):
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._files: dict[Path, _File] = {}
        self._lock = threading.Lock()

    def _open(self, path: Path, what: str) -> _File:
        with self._lock:
            f = self._files.get(path)
            if f is None:
                f = self._files[path] = _File(path, what, self.direct)
            return f

    def uses_direct(self, path: Path, what: str) -> bool:
        return self._open(path, what).direct_fd is not None

    def read_cached(self, path: Path, offset: int, views: Sequence[memoryview], what: str) -> int:
        """Copy the leading bytes of the range that the page cache holds into ``views``; how many.

        Only where O_DIRECT would otherwise bypass the cache; returns 0 elsewhere. The count is
        a multiple of ALIGN unless it covers the whole range.
        """
        f = self._open(path, what)
        if f.direct_fd is None or f.cache is None or not views:
            return 0
        length = sum(len(v) for v in views)
        n = f.cache.resident_prefix(offset, length)
        if n < length:
            n -= n % ALIGN
        if n <= 0:
            return 0
        got = 0
        for v in _cut(views, n):
            try:
                k = _pread_full(f.fd, v, offset + got)
            except OSError as e:
                raise _failed(path, what, offset + got, len(v), e) from e
            got += k
            if k < len(v):
                break
        return got if got == length else got - got % ALIGN

    def read(self, path: Path, offset: int, buf: torch.Tensor, length: int, what: str, cached: bool = True) -> None:
        """Fill ``buf[:length]`` (a uint8 CPU tensor) with the file's bytes from ``offset``.

        Cached bytes first, then O_DIRECT in whole aligned blocks (the files are padded to ALIGN;
        used as far as ``buf`` is aligned and has room), then buffered reads. A short read is a
        CheckpointError naming the file and ``what``.
        """
        f = self._open(path, what)
        view = memoryview(buf.numpy())
        if len(view) < length:
            raise ValueError(f"buffer of {len(view)} bytes cannot hold {length}")
        done = 0
        if f.direct_fd is not None and buf.data_ptr() % ALIGN == 0:
            done = self.read_cached(path, offset, [view[:length]], what) if cached else 0
            if done < length:
                want = min(round_up(length - done), (len(view) - done) // ALIGN * ALIGN)
                try:
                    got = _pread_full(f.direct_fd, view[done : done + want], offset + done) if want else 0
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise _failed(path, what, offset + done, want, e) from e
                    log.debug("O_DIRECT read failed for %s (%s); using buffered reads", path, e)
                    with self._lock:
                        if f.direct_fd is not None:
                            f.drop_direct()
                else:
                    if got < min(want, length - done):
                        raise _truncated(path, what, offset, length)
                    done = min(done + got, length)
        if done < length:
            self.read_into(path, offset + done, [view[done:length]], what)

    def read_direct(self, path: Path, offset: int, views: Sequence[memoryview], what: str) -> int:
        """One O_DIRECT vectored read into aligned, whole-block ``views``; bytes read (0 if O_DIRECT
        turned out not to work for this file, which then falls back to buffered reads)."""
        f = self._open(path, what)
        want = sum(len(v) for v in views)
        if f.direct_fd is None or not want:
            return 0
        got = 0
        try:
            while got < want:
                n = os.preadv(f.direct_fd, _skip(views, got), offset + got)
                if n == 0:
                    raise _truncated(path, what, offset, want)
                got += n
        except OSError as e:
            if e.errno != errno.EINVAL or got:
                raise _failed(path, what, offset + got, want - got, e) from e
            log.debug("O_DIRECT read failed for %s (%s); using buffered reads", path, e)
            with self._lock:
                if f.direct_fd is not None:
                    f.drop_direct()
        return got

    def read_into(self, path: Path, offset: int, views: Sequence[memoryview], what: str) -> None:
        """Buffered read that fills every view in order (they may be the target tensors themselves)."""
        fd = self._open(path, what).fd
        pos = offset
        for v in views:
            try:
                got = _pread_full(fd, v, pos)
            except OSError as e:
                raise _failed(path, what, pos, len(v), e) from e
            if got < len(v):
                raise _truncated(path, what, offset, sum(len(x) for x in views))
            pos += got

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()


def _pread_full(fd: int, view: memoryview, offset: int) -> int:
    """pread until ``view`` is full or the file ends; returns the bytes read."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got
