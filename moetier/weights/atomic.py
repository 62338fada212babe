"""Writes a kill cannot leave half done, and that clean up after the writers that were killed.

- :func:`new_folder`: a folder is built in a hidden temporary sibling
  ``.{name}.moetier-tmp-{pid}-{hex}`` and renamed into place only once everything in it is
  written and synced, so ``name`` is either absent, the previous folder, or complete.
- :func:`write_file`: one file through a temporary sibling, fsync and ``os.replace``.
- :func:`remove_stale`: each writer first removes the temporaries that writers before it left
  for the same target, if those writers are dead. A temporary folder is recognised by its name
  and by the marker file ``.moetier-owner`` inside it (JSON: the owner's pid, the process start
  time from /proc so a reused pid is not mistaken for the owner, and the host, since a pid on
  another host sharing the filesystem cannot be checked). A temporary file carries the pid in
  its name only. Anything whose owner may be alive, or that is not ours, is left alone.
- :class:`FileLock`: writers of the same target in several processes take turns (``flock``);
  the lock file is removed on release.
- :func:`check_free` / :func:`disk_full`: ENOSPC as a :class:`~moetier.errors.DiskFullError`
  that says how much is needed and how much is free.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..errors import DiskFullError
from ..units import fmt_size

log = logging.getLogger(__name__)

OWNER_FILE = ".moetier-owner"


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), if readable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)" start at field 3


def _owner() -> dict:
    pid = os.getpid()
    return {"pid": pid, "start": _start_time(pid), "host": socket.gethostname()}


def _alive(pid: int, start: Optional[str] = None, host: Optional[str] = None) -> bool:
    """Whether the writer may still be running (when in doubt: yes)."""
    if host is not None and host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    if start is not None:
        now = _start_time(pid)
        if now is not None and now != start:
            return False  # the pid was reused by a later process
    return True


def _temp_name(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.moetier-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _pattern(target: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.moetier-(tmp|old)-(\d+)-[0-9a-f]{{8}}")


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_owner(folder: Path) -> None:
    with open(folder / OWNER_FILE, "w") as fh:
        json.dump(_owner(), fh)


def _read_owner(folder: Path) -> Optional[dict]:
    try:
        rec = json.loads((folder / OWNER_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: not removable by us
    return rec if isinstance(rec, dict) else {}


def remove_stale(target: str | Path) -> list[Path]:
    """Remove the temporaries that dead writers left beside ``target``; returns what was removed."""
    target = Path(target)
    pattern = _pattern(target)
    try:
        entries = list(target.parent.iterdir())
    except FileNotFoundError:
        return []
    removed = []
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m is None:
            continue
        pid = int(m.group(2))
        if p.is_dir() and not p.is_symlink():
            rec = _read_owner(p)
            if rec is None:  # killed between making the folder and writing its marker: empty
                if any(p.iterdir()) or _alive(pid):
                    continue
            elif rec.get("pid") != pid or _alive(pid, rec.get("start"), rec.get("host")):
                continue
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and m.group(1) == "tmp" and not _alive(pid):
            p.unlink(missing_ok=True)
        else:
            continue
        log.info("removed %s, left by an interrupted write (process %d)", p, pid)
        removed.append(p)
    return removed


def check_free(folder: str | Path, need: int) -> None:
    """Raise DiskFullError now if ``folder``'s filesystem has less than ``need`` bytes free."""
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DiskFullError(f"{folder}: disk full: {fmt_size(need)} needed, {fmt_size(free)} free")


def disk_full(folder: str | Path, need: int, cause: OSError) -> DiskFullError:
    """The error for an ENOSPC met while writing, after the partial output was removed."""
    free = shutil.disk_usage(folder).free
    return DiskFullError(f"{folder}: disk full: {fmt_size(need)} needed, {fmt_size(free)} free (the disk filled "
                         f"up while writing: {cause.strerror or cause}; the partial output was removed)")


def sync_tree(folder: Path) -> None:
    """fsync every file in ``folder`` (one level; what convert writes) and the folder itself."""
    for p in folder.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def _install(tmp: Path, dst: Path) -> None:
    """Rename the finished ``tmp`` to ``dst``; a folder already there is moved aside first and
    removed only after the rename (a kill in between leaves it as a stale temporary)."""
    old = None
    if dst.exists():
        if any(dst.iterdir()):
            old = _temp_name(dst, "old")
            _write_owner(dst)  # so that a kill before its removal leaves it removable
            dst.rename(old)
        else:
            dst.rmdir()
    try:
        tmp.rename(dst)
    except OSError:
        if old is not None and not dst.exists():
            old.rename(dst)
            (dst / OWNER_FILE).unlink(missing_ok=True)
        raise
    fsync_dir(dst.parent)
    (dst / OWNER_FILE).unlink(missing_ok=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def new_folder(dst: str | Path, need: Optional[int] = None) -> Iterator[Path]:
    """Build the folder ``dst`` in a hidden temporary sibling, yielded; install it when the block ends.

    Before anything is written, stale temporaries of ``dst`` are removed and, when ``need``
    (bytes) is given, the free space is checked. On leaving the block normally every file is
    synced and the folder renamed into place (replacing what was there); on an error or
    interrupt the temporary is removed, and an ENOSPC becomes a DiskFullError.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dst)
    if need is not None:
        check_free(dst.parent, need)
    tmp = _temp_name(dst, "tmp")
    tmp.mkdir()
    try:
        _write_owner(tmp)
        yield tmp
        sync_tree(tmp)
        _install(tmp, dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise disk_full(dst.parent, need or 0, e) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file(path: str | Path, write: Callable, mode: str = "wb") -> None:
    """Write ``path`` whole or not at all: ``write(fh)`` fills a temporary sibling, which is
    synced and renamed over ``path``. Stale temporaries of dead writers are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = _temp_name(path, "tmp")
    try:
        with open(tmp, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class FileLock:
    """An exclusive ``flock`` on ``path`` (created if missing), for writers in several processes.

    The file is unlinked on release; a waiter that then holds the lock on the unlinked file
    notices (its inode is no longer the path's) and locks the new one, so the lock stays
    exclusive and leaves no file behind (a killed holder leaves the file, unlocked, for the next).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: Optional[int] = None

    def __enter__(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return self
            os.close(fd)

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
