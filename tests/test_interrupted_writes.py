"""Interrupted writes: a convert or a trace-library save killed (SIGKILL) at any point leaves
nothing that loads, the next writer cleans up after it, and a full disk says so."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moetier import LLM, CheckpointError, ConfigError, SamplingParams
from moetier.cli import main
from moetier.errors import DiskFullError
from moetier.experts.trace import TraceLibrary
from moetier.weights import atomic, packed_write
from moetier.weights.packed import INDEX_NAME, PackedCheckpoint, is_packed
from moetier.weights.packed_write import convert
from tiny import FAMILY_CONFIGS, make_checkpoint

REPO = Path(__file__).resolve().parent.parent
CONFIG = FAMILY_CONFIGS["mixtral"]  # 3 MoE layers of 6 experts: 18 expert regions
EXPERTS = CONFIG["num_hidden_layers"] * CONFIG["num_local_experts"]
PROMPTS = [[5, 17, 99, 3, 42, 42, 7, 120], [64, 1, 88]]
PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
DISK_FULL = r"disk full: [\d.]+ (B|KiB|MiB|GiB) needed, [\d.]+ (B|KiB|MiB|GiB) free"

# A child that converts HF_DIR into OUT_DIR and SIGKILLs itself at a chosen point.
KILL_CONVERT = r"""
import os, pathlib, signal, sys
from moetier.weights import atomic, packed_write
from moetier.weights.packed import INDEX_NAME

src, dst, point, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
calls = 0

def counting(real):
    def f(*a, **kw):
        global calls
        calls += 1
        out = real(*a, **kw)
        if calls == k:
            die()  # right after the k-th region reached the file
        return out
    return f

if point == "dense":
    packed_write._write_dense = counting(packed_write._write_dense)
elif point == "expert":
    packed_write._write_expert = counting(packed_write._write_expert)
elif point == "index":  # half the index written and synced
    real_synced = packed_write._write_synced
    def half(path, text):
        if pathlib.Path(path).name != INDEX_NAME:
            return real_synced(path, text)
        with open(path, "w") as fh:
            fh.write(text[: len(text) // 2]); fh.flush(); os.fsync(fh.fileno())
        die()
    packed_write._write_synced = half
elif point == "rename":  # everything written and synced, nothing renamed
    real_install = atomic._install
    atomic._install = lambda tmp, dst: die()
elif point == "between-renames":  # --force: the old folder moved aside, the new one not yet in place
    real_rename = pathlib.Path.rename
    def rename(self, target):
        out = real_rename(self, target)
        if ".moetier-old-" in str(target):
            die()
        return out
    pathlib.Path.rename = rename
packed_write.convert(src, dst, progress=False, force=True)
"""


def _kill_convert(src: Path, dst: Path, point: str, k: int = 1) -> None:
    r = subprocess.run([sys.executable, "-c", KILL_CONVERT, str(src), str(dst), point, str(k)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-2000:])


def _hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("mixtral") / "hf", "mixtral", CONFIG)


@pytest.fixture(scope="module")
def good(hf, tmp_path_factory):
    """A packed copy made without interruption: the reference for every rerun."""
    return convert(hf, tmp_path_factory.mktemp("good") / "packed", progress=False)


def _same_folder(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        if n.startswith("weights-"):
            assert (a / n).read_bytes() == (b / n).read_bytes(), n


# -- convert killed ------------------------------------------------------------------------------

@pytest.mark.parametrize("point,k", [("dense", 2), ("expert", EXPERTS // 2), ("expert", EXPERTS),
                                     ("index", 1), ("rename", 1)])
def test_killed_convert_leaves_no_folder_and_the_rerun_cleans_up(hf, good, tmp_path, point, k):
    dst = tmp_path / "packed"
    _kill_convert(hf, dst, point, k)
    assert not dst.exists()  # nothing under the target's name, whatever was written
    with pytest.raises(ConfigError, match="does not exist"):
        LLM(dst)
    with pytest.raises(CheckpointError, match="not a packed moetier checkpoint"):
        PackedCheckpoint(dst)
    stale = _hidden(tmp_path)
    assert len(stale) == 1 and re.fullmatch(r"\.packed\.moetier-tmp-\d+-[0-9a-f]{8}", stale[0]), stale
    assert json.loads((tmp_path / stale[0] / atomic.OWNER_FILE).read_text())["pid"] > 0

    assert main(["convert", str(hf), str(dst), "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]  # the stale folder is gone
    _same_folder(dst, good)
    with PackedCheckpoint(dst) as ckpt:
        ckpt.verify(progress=False)


def test_killed_forced_convert_keeps_the_old_folder_or_none(hf, good, tmp_path):
    dst = convert(hf, tmp_path / "packed", progress=False)
    _kill_convert(hf, dst, "expert", EXPERTS // 2)
    assert is_packed(dst) and not (dst / atomic.OWNER_FILE).exists()  # the old folder, whole
    with PackedCheckpoint(dst) as ckpt:
        ckpt.verify(progress=False)

    _kill_convert(hf, dst, "between-renames")
    assert not dst.exists()
    with pytest.raises(ConfigError, match="does not exist"):
        LLM(dst)
    kinds = sorted(re.sub(r"-\d+-[0-9a-f]{8}$", "", n) for n in _hidden(tmp_path))
    assert kinds == [".packed.moetier-old", ".packed.moetier-tmp"], _hidden(tmp_path)

    convert(hf, dst, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]
    _same_folder(dst, good)


def _start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def _fake_temp(root: Path, pid: int, start: str, name: str = "packed", marker: bool = True) -> Path:
    p = root / f".{name}.moetier-tmp-{pid}-{os.urandom(4).hex()}"
    p.mkdir()
    (p / "weights-00001.bin").write_bytes(b"\0" * 100)
    if marker:
        (p / atomic.OWNER_FILE).write_text(json.dumps({"pid": pid, "start": start, "host": socket.gethostname()}))
    return p


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to tell a live writer")
def test_only_temporaries_of_dead_owners_are_removed(hf, tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        alive_tmp = _fake_temp(tmp_path, live.pid, _start_time(live.pid))
        reused = _fake_temp(tmp_path, live.pid, "1")  # the pid now belongs to a later process
        dead_tmp = _fake_temp(tmp_path, dead.pid, "1")
        unmarked = _fake_temp(tmp_path, dead.pid, "1", marker=False)  # not provably ours: kept
        other = _fake_temp(tmp_path, dead.pid, "1", name="elsewhere")  # another target's
        convert(hf, tmp_path / "packed", progress=False)
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {"packed", alive_tmp.name, unmarked.name, other.name}, left
        assert reused.name not in left and dead_tmp.name not in left
    finally:
        live.kill()
        live.wait()
    convert(hf, tmp_path / "packed", progress=False, force=True)
    assert alive_tmp.name not in {p.name for p in tmp_path.iterdir()}  # its owner is gone now


# -- two processes converting into the same offload_dir ------------------------------------------

def _waiting_on_flock(pids: set[int]) -> set[int]:
    """The pids blocked on a flock (the "->" lines of /proc/locks)."""
    out = set()
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if "->" in f and "FLOCK" in f:
            out.add(int(f[f.index("->") + 4]))
    return out & pids


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs /proc/locks to see the waiters")
def test_processes_sharing_an_offload_dir_convert_once(hf, good, tmp_path):
    off = tmp_path / "off"
    script = (f"from moetier import LLM; LLM({str(hf)!r}, expert_slots=8, offload_dir={str(off)!r}).close()")
    lock = atomic.FileLock(off / ".packed-float32.lock")
    with lock:  # both children queue behind us, then behind each other
        kids = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
        deadline = time.monotonic() + 240
        while _waiting_on_flock({k.pid for k in kids}) != {k.pid for k in kids}:
            assert all(k.poll() is None for k in kids), "a child finished without waiting for the lock"
            assert time.monotonic() < deadline, "the children never waited on the conversion lock"
            time.sleep(0.2)
    errs = [k.communicate(timeout=300)[1] for k in kids]
    assert [k.returncode for k in kids] == [0, 0], errs
    assert sum(e.count("converting") for e in errs) == 1, errs  # the second found it done
    assert sorted(p.name for p in off.iterdir()) == ["packed-float32"]  # no lock or temp left
    _same_folder(off / "packed-float32", good)


# -- the trace library killed mid-save -------------------------------------------------------------

KILL_SAVE = r"""
import io, os, signal, sys
import numpy as np
from moetier.experts import trace
from moetier.weights import atomic

path, point = sys.argv[1], sys.argv[2]
with np.load(path) as d:
    layers, experts = d["traces"].shape[1:]
lib = trace.TraceLibrary.load(path, layers, experts)
lib.add(np.random.default_rng(0).integers(0, 5, (layers, experts)))
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_savez = np.savez
if point == "half":  # half the bytes on disk, synced
    def savez(fh, **arrays):
        buf = io.BytesIO(); real_savez(buf, **arrays); data = buf.getvalue()
        fh.write(data[: len(data) // 2]); fh.flush(); os.fsync(fh.fileno())
        die()
    np.savez = savez
elif point == "replace":  # the new file whole and synced, not yet renamed
    atomic.os.replace = lambda a, b: die()
lib.save(path)
"""


def _run(llm):
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS,
                                                         use_tqdm=False)]


@pytest.mark.parametrize("point", ["half", "replace"])
def test_trace_library_survives_a_kill_mid_save(hf, tmp_path, point):
    off = tmp_path / "off"
    with LLM(hf, dtype="float32", expert_slots=9, offload_dir=off, prefetch="trace") as llm:
        want = _run(llm)
    lib_path = off / "traces.npz"
    before = lib_path.read_bytes()
    with np.load(lib_path) as d:
        n = len(d["traces"])
    assert n > 0

    r = subprocess.run([sys.executable, "-c", KILL_SAVE, str(lib_path), point], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert lib_path.read_bytes() == before  # the old library, untouched
    assert [p.name for p in off.iterdir() if ".moetier-tmp-" in p.name]  # the kill left its temp file

    with LLM(hf, dtype="float32", expert_slots=9, offload_dir=off, prefetch="trace") as llm:
        assert len(llm.engine.offload.library) == n  # the next start reads the old library
        assert _run(llm) == want
    assert not [p.name for p in off.iterdir() if ".moetier-tmp-" in p.name]  # the next save cleaned up
    with np.load(lib_path) as d:
        assert len(d["traces"]) >= 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_trace_library_is_ignored_with_a_warning(hf, tmp_path, caplog, damage):
    off = tmp_path / "off"
    with LLM(hf, dtype="float32", expert_slots=9, offload_dir=off, prefetch="trace") as llm:
        want = _run(llm)
    lib_path = off / "traces.npz"
    data = lib_path.read_bytes()
    lib_path.write_bytes({"truncated": data[: len(data) * 2 // 3], "garbage": os.urandom(len(data)),
                          "empty": b""}[damage])
    with caplog.at_level("WARNING", logger="moetier.experts.trace"):
        with LLM(hf, dtype="float32", expert_slots=9, offload_dir=off, prefetch="trace") as llm:
            assert len(llm.engine.offload.library) == 0
            assert _run(llm) == want
    assert any("ignoring the trace library" in r.getMessage() and str(lib_path) in r.getMessage()
               for r in caplog.records), caplog.text
    lib = TraceLibrary.load(lib_path, CONFIG["num_hidden_layers"], CONFIG["num_local_experts"])
    assert len(lib) > 0  # the close saved a good one over it


# -- a full disk ---------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the asked size (needs root, or CAP_SYS_ADMIN); skip, saying why, where not allowed."""
    mounts = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill ({r.stderr.strip() or 'mount failed'}); "
                        f"test_disk_full_mid_write_without_a_mount covers the same path in-process")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_disk_full_is_said_before_writing(hf, small_disk, capsys):
    disk = small_disk(64 * 1024)
    with pytest.raises(DiskFullError, match=DISK_FULL):
        convert(hf, disk / "packed", progress=False)
    assert list(disk.iterdir()) == []
    assert main(["convert", str(hf), str(disk / "packed"), "--quiet"]) == 1
    assert re.search(DISK_FULL, capsys.readouterr().err)
    assert list(disk.iterdir()) == []


def test_disk_full_mid_write_on_a_real_filesystem(hf, good, small_disk, monkeypatch):
    size = sum(f.stat().st_size for f in good.iterdir())
    disk = small_disk(size // 2)  # room for half the output
    real = atomic.shutil.disk_usage
    calls = []

    def plenty_at_first(path):  # the space was there at the check, then taken by someone else
        calls.append(path)
        u = real(path)
        return u._replace(free=10 * size) if len(calls) == 1 else u

    monkeypatch.setattr(atomic.shutil, "disk_usage", plenty_at_first)
    with pytest.raises(DiskFullError, match=DISK_FULL) as e:
        convert(hf, disk / "packed", progress=False)
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    assert list(disk.iterdir()) == []  # the partial folder was removed


def test_disk_full_mid_write_without_a_mount(hf, tmp_path, monkeypatch):
    calls = 0
    real = packed_write._write_expert

    def enospc_at_the_fifth(*a, **kw):  # what the OS raises when a write finds the disk full
        nonlocal calls
        calls += 1
        if calls == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a, **kw)

    monkeypatch.setattr(packed_write, "_write_expert", enospc_at_the_fifth)
    with pytest.raises(DiskFullError, match=DISK_FULL):
        convert(hf, tmp_path / "packed", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_too_little_space_is_refused_before_anything_is_written(hf, good, tmp_path, monkeypatch):
    size = sum(f.stat().st_size for f in good.iterdir())
    real = atomic.shutil.disk_usage
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: real(p)._replace(free=size - 1))
    with pytest.raises(DiskFullError, match=DISK_FULL):
        convert(hf, tmp_path / "packed", progress=False)
    assert list(tmp_path.iterdir()) == []
    # the estimate is not wildly above what is written: 10 % more than the folder fits
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: real(p)._replace(free=int(size * 1.1) + 65536))
    convert(hf, tmp_path / "packed", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]


def test_a_full_disk_at_library_save_warns_and_keeps_the_old_library(hf, good, small_disk, caplog):
    size = sum(f.stat().st_size for f in good.iterdir())
    off = small_disk(size + 512 * 1024)  # the packed copy and its library, little more
    with LLM(hf, dtype="float32", expert_slots=9, offload_dir=off, prefetch="trace") as llm:
        want = _run(llm)
    before = (off / "traces.npz").read_bytes()
    with open(off / "filler", "wb", buffering=0) as fh:  # take every block left
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    with caplog.at_level("WARNING", logger="moetier.experts.offload"):
        with LLM(hf, dtype="float32", expert_slots=9, offload_dir=off, prefetch="trace") as llm:
            assert _run(llm) == want
    assert any("could not save the trace library" in r.getMessage() for r in caplog.records), caplog.text
    assert (off / "traces.npz").read_bytes() == before
    assert sorted(p.name for p in off.iterdir()) == ["filler", "packed-float32", "traces.npz"]
