"""Finding the processes Ray started for a test: by the title Ray gives them (what ``ps`` shows)."""

import os


def titled(part: bytes) -> list[int]:
    """Pids of this process's descendants whose title (argv[0]) contains ``part``, e.g. b"ray::MoetierReplica"."""
    me, found = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0]
        except OSError:
            continue
        if part in title and _descends_from(int(pid), me):
            found.append(int(pid))
    return found


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False
