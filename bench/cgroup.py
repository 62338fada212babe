"""Run a command under a real RAM limit: a fresh memory cgroup whose limit counts page cache.

A machine with N bytes of RAM holds the process, its page cache (files it reads and writes,
mapped libraries, mmapped weights) and nothing else; ``memory.max`` (cgroup v2) or
``memory.limit_in_bytes`` (v1) of a cgroup of its own charges the same things, so a run in one
is a run on that machine. Swap is turned off in the group (v2 ``memory.swap.max = 0``, v1
``memory.memsw.limit_in_bytes = limit``), so going over the limit means the OOM killer.

:func:`run_limited` makes the group (v2 or v1, whichever this machine lets us write; it needs
root or a delegated subtree), starts the command in it, waits, and reports the exit status, the
group's peak memory (v2 ``memory.peak``, v1 ``memory.max_usage_in_bytes``) and whether the OOM
killer ran; the group is removed afterwards. :func:`cgroup_support` says why no group can be
made where none can (tests skip with that reason).

    python bench/cgroup.py 512MiB -- python -c "b = bytearray(256 << 20)"
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence


@dataclass
class LimitedRun:
    """What :func:`run_limited` saw: exit status, peak bytes charged to the group, OOM kill."""

    returncode: int
    peak_bytes: Optional[int]
    oom_killed: bool
    timed_out: bool
    limit_hits: Optional[int]  # times usage reached the limit and the kernel had to reclaim (v1 failcnt, v2 "max")
    stdout: str
    stderr: str
    cgroup: str  # "v2" or "v1"
    limit_bytes: int

    @property
    def reached_limit(self) -> bool:
        """Whether usage reached the limit (the kernel then reclaims page cache to stay within it; a
        v1 failcnt is not counted for that on every kernel, so this reads the peak)."""
        return self.peak_bytes is not None and self.peak_bytes >= self.limit_bytes - (4 << 20)


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, options) of every cgroup filesystem."""
    out = []
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
                    out.append((parts[1], parts[2], set(parts[3].split(","))))
    except OSError:
        pass
    return out


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per hierarchy: ``"v2"`` -> path, ``"memory"`` -> v1 path."""
    out = {}
    try:
        with open("/proc/self/cgroup") as fh:
            for line in fh:
                hid, ctrls, path = line.rstrip("\n").split(":", 2)
                if hid == "0" and ctrls == "":
                    out["v2"] = path
                elif "memory" in ctrls.split(","):
                    out["memory"] = path
    except OSError:
        pass
    return out


def _writable_dir(parent: Path) -> Optional[str]:
    """None if a child cgroup can be made in ``parent``, else why not."""
    probe = parent / f"moetier-probe-{secrets.token_hex(3)}"
    try:
        probe.mkdir()
    except OSError as e:
        return f"cannot create a cgroup in {parent} ({e.strerror})"
    try:
        probe.rmdir()
    except OSError:
        pass
    return None


def _v2_parent(mount: Path, own: Optional[str]) -> tuple[Optional[Path], str]:
    """A v2 cgroup whose children get the memory controller: our own group, its parent, or the root."""
    reasons = []
    candidates = []
    if own is not None:
        p = mount / own.lstrip("/")
        candidates += [p, p.parent]
    candidates.append(mount)
    seen = set()
    for cand in candidates:
        if cand in seen or not cand.is_dir() or mount not in (cand, *cand.parents):
            continue
        seen.add(cand)
        try:
            if "memory" not in (cand / "cgroup.controllers").read_text().split():
                reasons.append(f"{cand}: no memory controller")
                continue
            sub = cand / "cgroup.subtree_control"
            if "memory" not in sub.read_text().split():
                sub.write_text("+memory")  # fails where the group holds processes of its own
        except OSError as e:
            reasons.append(f"{cand}: cannot enable the memory controller ({e.strerror})")
            continue
        why = _writable_dir(cand)
        if why is None:
            return cand, ""
        reasons.append(why)
    return None, "; ".join(reasons) or f"{mount}: no usable cgroup"


def _find() -> tuple[Optional[str], Optional[Path], str]:
    """("v2" | "v1", parent folder, "") where a memory cgroup can be made, or (None, None, why not)."""
    if not sys.platform.startswith("linux"):
        return None, None, "memory cgroups are Linux only"
    own = _own_paths()
    reasons = []
    for mount, fstype, opts in _mounts():
        if fstype == "cgroup2":
            parent, why = _v2_parent(Path(mount), own.get("v2"))
            if parent is not None:
                return "v2", parent, ""
            reasons.append(f"v2: {why}")
    for mount, fstype, opts in _mounts():
        if fstype == "cgroup" and "memory" in opts:
            base = Path(mount)
            own_dir = base / own.get("memory", "/").lstrip("/")
            parent = own_dir if own_dir.is_dir() else base
            why = _writable_dir(parent)
            if why is None:
                return "v1", parent, ""
            reasons.append(f"v1: {why}")
    if not reasons:
        reasons.append("no cgroup filesystem with the memory controller is mounted")
    return None, None, "; ".join(reasons)


def cgroup_support() -> tuple[bool, str]:
    """(True, "v2" | "v1") where :func:`run_limited` can make a memory cgroup, else (False, why not)."""
    kind, _, why = _find()
    return (True, kind) if kind else (False, why)


def _read_int(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _keyed(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines() if line.strip())}
    except (OSError, ValueError):
        return {}


def _set_limit(kind: str, group: Path, limit: int) -> None:
    if kind == "v2":
        (group / "memory.max").write_text(str(limit))
        if (group / "memory.swap.max").exists():
            (group / "memory.swap.max").write_text("0")
        if (group / "memory.oom.group").exists():
            (group / "memory.oom.group").write_text("1")  # an OOM kill takes the whole run, not one thread's victim
    else:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        if (group / "memory.memsw.limit_in_bytes").exists():  # memory + swap = memory: no swap
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
        if (group / "memory.swappiness").exists():
            try:
                (group / "memory.swappiness").write_text("0")
            except OSError:
                pass


def _oom_kills(kind: str, group: Path) -> int:
    if kind == "v2":
        return _keyed(group / "memory.events").get("oom_kill", 0)
    return _keyed(group / "memory.oom_control").get("oom_kill", 0)


def _limit_hits(kind: str, group: Path) -> Optional[int]:
    if kind == "v2":
        return _keyed(group / "memory.events").get("max")
    counts = [_read_int(group / f) for f in ("memory.failcnt", "memory.memsw.failcnt")]  # memsw: the no-swap limit
    counts = [c for c in counts if c is not None]
    return max(counts) if counts else None


def _peak(kind: str, group: Path) -> Optional[int]:
    return _read_int(group / ("memory.peak" if kind == "v2" else "memory.max_usage_in_bytes"))


def _remove(kind: str, group: Path) -> None:
    """Kill what is left in the group, then remove it (its page cache moves to the parent)."""
    for _ in range(50):
        try:
            pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
        except OSError:
            return
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    for _ in range(50):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


def run_limited(cmd: Sequence[str], limit: int, *, timeout: Optional[float] = None, env: Optional[dict] = None,
                cwd: Optional[str | Path] = None) -> LimitedRun:
    """Run ``cmd`` in a fresh memory cgroup of ``limit`` bytes (page cache counted, no swap).

    Raises RuntimeError (saying why) where no memory cgroup can be made. A run past ``timeout``
    seconds is killed and reported with ``timed_out``.
    """
    kind, parent, why = _find()
    if kind is None:
        raise RuntimeError(f"no writable memory cgroup: {why}")
    group = parent / f"moetier-run-{os.getpid()}-{secrets.token_hex(4)}"
    group.mkdir()
    try:
        _set_limit(kind, group, int(limit))
        procs = str(group / "cgroup.procs")

        def enter() -> None:  # in the child, before exec: everything it starts is charged to the group
            with open(procs, "w") as fh:
                fh.write(str(os.getpid()))

        p = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             cwd=cwd, preexec_fn=enter)
        timed_out = False
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            p.kill()
            out, err = p.communicate()
        return LimitedRun(p.returncode, _peak(kind, group), _oom_kills(kind, group) > 0, timed_out,
                          _limit_hits(kind, group), out, err, kind, int(limit))
    finally:
        _remove(kind, group)


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit("usage: python bench/cgroup.py LIMIT -- COMMAND [ARGS...]")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from moetier.units import parse_size

    r = run_limited(sys.argv[3:], parse_size(sys.argv[1]))
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    info = {k: v for k, v in asdict(r).items() if k not in ("stdout", "stderr")}
    info["peak_mib"] = None if r.peak_bytes is None else round(r.peak_bytes / 2**20, 1)
    info["reached_limit"] = r.reached_limit
    print(json.dumps({"what": "cgroup_run", **info}))


if __name__ == "__main__":
    main()
