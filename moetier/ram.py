"""How much RAM this process may take, for ``device_memory="auto"``.

The limit is the memory cgroup's where there is one (cgroup v2 ``memory.max``, v1
``memory.limit_in_bytes``, the smallest along the path to the root, as the kernel enforces
it), else the RAM the kernel calls available (``MemAvailable``); where both exist, the
smaller. Either counts page cache as well as the process, which is how moetier keeps within
it: experts are read with O_DIRECT, conversion drops what it reads and writes from the cache.
A cgroup's limit is shared by every process in the group: ``auto`` assumes moetier is alone in
it (give a size where it is not).

A budget does not count the process itself: the interpreter, torch and its libraries (their
code pages are page cache too), the tokenizer, activations and I/O buffers. A budget of B on the
CPU runs, first-use conversion included, in B + :data:`PROCESS_OVERHEAD` of RAM, page cache
counted (``tests/test_ram_budget.py`` checks it in a memory cgroup; measured on the medium
benchmark Mixtral, 16 layers, 2.8 GiB: about 220 MiB over the budget). ``auto`` leaves
:data:`AUTO_MARGIN` (the same) of the limit for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .errors import MoetierError
from .units import fmt_size, parse_size

PROCESS_OVERHEAD = 512 << 20  # RAM a process takes beyond its budget (see the module docstring)
AUTO_MARGIN = PROCESS_OVERHEAD  # bytes of the limit left outside an "auto" budget
_UNLIMITED = 1 << 60  # v1 reports "no limit" as a huge page-rounded number


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_paths() -> dict[str, str]:
    out = {}
    text = _read(Path("/proc/self/cgroup")) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, ctrls, path = parts
        if hid == "0" and ctrls == "":
            out["v2"] = path
        elif "memory" in ctrls.split(","):
            out["v1"] = path
    return out


def _mounts() -> dict[str, Path]:
    out: dict[str, Path] = {}
    text = _read(Path("/proc/mounts")) or ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        if parts[2] == "cgroup2" and "v2" not in out:
            out["v2"] = Path(parts[1])
        elif parts[2] == "cgroup" and "memory" in parts[3].split(",") and "v1" not in out:
            out["v1"] = Path(parts[1])
    return out


def _smallest_along(mount: Path, path: str, name: str) -> Optional[int]:
    """The smallest limit in file ``name`` from this cgroup up to the mount's root (None: none set)."""
    best = None
    d = mount / path.lstrip("/")
    if not d.is_dir():  # a cgroup namespace shows our own group as the mount's root
        d = mount
    for folder in (d, *d.parents):
        if mount not in (folder, *folder.parents):
            break
        value = _read(folder / name)
        if value is None or value == "max":
            continue
        try:
            n = int(value)
        except ValueError:
            continue
        if n < _UNLIMITED:
            best = n if best is None else min(best, n)
    return best


def cgroup_limit() -> Optional[int]:
    """This process's memory cgroup limit in bytes (v2 or v1), or None where it has none."""
    paths, mounts = _cgroup_paths(), _mounts()
    limits = []
    if "v2" in paths and "v2" in mounts:
        limits.append(_smallest_along(mounts["v2"], paths["v2"], "memory.max"))
    if "v1" in paths and "v1" in mounts:
        limits.append(_smallest_along(mounts["v1"], paths["v1"], "memory.limit_in_bytes"))
    limits = [n for n in limits if n is not None]
    return min(limits) if limits else None


def available_ram() -> Optional[int]:
    """``MemAvailable`` from /proc/meminfo in bytes (None where there is no such file)."""
    for line in (_read(Path("/proc/meminfo")) or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def ram_limit() -> tuple[int, str]:
    """``(bytes, where from)``: the cgroup limit, the available RAM, or the smaller of the two."""
    limit, avail = cgroup_limit(), available_ram()
    if limit is not None and (avail is None or limit <= avail):
        return limit, "the memory cgroup's limit"
    if avail is not None:
        return avail, "available RAM (MemAvailable)"
    raise MoetierError("device_memory='auto' cannot tell how much RAM there is (no cgroup limit, no "
                       "/proc/meminfo); give a size, e.g. device_memory='8GiB'")


def auto_budget(margin: int = AUTO_MARGIN) -> int:
    """The ``"auto"`` RAM budget: :func:`ram_limit` less ``margin``."""
    limit, source = ram_limit()
    if limit <= margin:
        raise MoetierError(f"device_memory='auto': {source} is {fmt_size(limit)}, no more than the "
                           f"{fmt_size(margin)} left for the process itself; give a size instead")
    return limit - margin


def resolve_budget(value: Optional[str | int], device: str = "cpu") -> Optional[int]:
    """A budget as the user gave it (``None``, bytes, ``"6GiB"`` or ``"auto"``) in bytes.

    ``"auto"`` is the CPU's RAM budget (:func:`auto_budget`); on a GPU it is an error, since
    the device's memory is not what a cgroup or MemAvailable measure.
    """
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        if not str(device).startswith("cpu"):
            raise MoetierError(f"device_memory='auto' is the RAM budget on device='cpu'; on {device} give a size")
        return auto_budget()
    return parse_size(value)


def _main() -> None:  # python -m moetier.ram: what "auto" would pick here
    limit, source = ram_limit()
    print(f"{source}: {fmt_size(limit)}; auto budget: {fmt_size(auto_budget())} "
          f"(margin {fmt_size(AUTO_MARGIN)}); pid {os.getpid()}")


if __name__ == "__main__":
    _main()
