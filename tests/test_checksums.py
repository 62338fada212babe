"""Bytes are checked when first read: a corrupt expert region, a file cut short or replaced after
opening, and EIO all surface as errors (never as zeros or wrong answers), in generate, the
server and batch jobs; ``verify="off"`` skips the checksums."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from moetier import LLM, CheckpointError, SamplingParams
from moetier.batch_file import run_batch
from moetier.cli import main
from moetier.demo import demo_path
from moetier.weights import direct_io
from moetier.weights.checksum import crc32, parse_verify
from moetier.weights.packed import INDEX_NAME
from moetier.weights.packed_write import convert
from tiny import fixed_machine_profile

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "12+34="
GREEDY = SamplingParams(max_tokens=4, temperature=0, logprobs=0)
LAYER = 1  # the layer whose expert regions are damaged


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """The demo model in the packed format."""
    return convert(demo_path(), tmp_path_factory.mktemp("clean") / "packed", progress=False)


@pytest.fixture(scope="module")
def reference(clean):
    """What the undamaged folder answers, offloaded as the tests run it: (text, logprobs)."""
    with LLM(clean, expert_slots=8) as llm:
        out = llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0]
    return out.text, [lp["logprob"] for lp in out.logprobs]


def _experts(folder: Path, layer: int) -> list[dict]:
    index = json.loads((folder / INDEX_NAME).read_text())
    return [e for e in index["experts"] if e["layer"] == layer]


def damage(folder: Path, layer: int = LAYER) -> list[tuple[Path, int, bytes]]:
    """Flip 64 bytes in the middle of every expert region of ``layer``, in place (the index is
    untouched); returns what was there, for :func:`repair`."""
    saved = []
    for e in _experts(folder, layer):
        path, mid = folder / e["file"], e["offset"] + e["nbytes"] // 2
        with open(path, "r+b") as f:
            f.seek(mid)
            good = f.read(64)
            f.seek(mid)
            f.write(bytes(b ^ 0xFF for b in good))
        saved.append((path, mid, good))
    return saved


def repair(saved: list[tuple[Path, int, bytes]]) -> None:
    for path, at, good in saved:
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(good)


@pytest.fixture
def copy(clean, tmp_path) -> Path:
    """A copy of the clean packed folder, free to damage."""
    return Path(shutil.copytree(clean, tmp_path / "packed"))


def _expert_error(layer: int = LAYER) -> str:
    """A checksum mismatch that names the file, the layer and the expert."""
    return (r"weights-\d+\.bin: checksum mismatch in tensor 'model\.layers\.%d\.mlp\.experts\[(\d)\]' "
            r"\(expert \1 of layer %d\)" % (layer, layer))


def test_verify_values():
    assert [parse_verify(v) for v in (None, True, False, "off", "first-read", "full")] == \
        ["first-read", "full", "off", "off", "first-read", "full"]
    with pytest.raises(ValueError, match="first-read"):
        parse_verify("yes")
    with pytest.raises(ValueError, match="verify='sometimes'"):
        LLM("demo", verify="sometimes")
    data = os.urandom(100_000)
    import zlib

    assert crc32(data) == zlib.crc32(data) and crc32(data[50:], crc32(data[:50])) == zlib.crc32(data)


def test_corrupt_expert_fails_generate_then_repaired_bytes_are_served(copy, reference):
    saved = damage(copy)
    llm = LLM(copy, expert_slots=8)  # the dense weights are fine: the load succeeds
    try:
        with pytest.raises(CheckpointError, match=_expert_error()):
            llm.generate([PROMPT], GREEDY, use_tqdm=False)
        assert not any(k[0] == LAYER for k in llm.engine.offload.store.resident())  # nothing kept from it
        # the same process reads the experts again on the next request: repaired, they give the clean answer
        repair(saved)
        out = llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0]
        assert (out.text, [lp["logprob"] for lp in out.logprobs]) == reference
        assert any(k[0] == LAYER for k in llm.engine.offload.store.source.verified)  # checked, and they passed
    finally:
        llm.close()


def test_verify_off_reads_the_damaged_bytes_unchecked(copy, reference):
    damage(copy)
    with LLM(copy, expert_slots=8, verify="off") as llm:
        out = llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0]
        assert llm.engine.offload.store.source.verified == set()
    # the answer was computed from the flipped bytes: its logprobs are not the clean run's
    assert [lp["logprob"] for lp in out.logprobs] != reference[1]


def test_resident_load_of_a_corrupt_folder_is_caught(copy):
    damage(copy)
    with pytest.raises(CheckpointError, match=_expert_error()):
        LLM(copy)  # every region is read while loading: each one's first read is checked
    LLM(copy, verify="off").close()


def test_full_checks_before_the_first_token_first_read_once_per_expert(copy):
    saved = damage(copy)
    with pytest.raises(CheckpointError, match=r"8 corrupt region\(s\):\n  .*" + _expert_error()):
        LLM(copy, expert_slots=8, verify="full")
    repair(saved)
    for mode in ("first-read", "full"):
        with LLM(copy, expert_slots=8, verify=mode) as llm:
            llm.generate([PROMPT], GREEDY, use_tqdm=False)  # reads and checks every layer's experts
            store = llm.engine.offload.store
            assert store.stats.evictions > 0  # 32 experts through 8 slots: layer 1 is read again below
            saved = damage(copy)
            try:
                if mode == "full":  # every read is checked
                    with pytest.raises(CheckpointError, match=_expert_error()):
                        llm.generate([PROMPT], GREEDY, use_tqdm=False)
                else:  # as documented: an expert checked once is not checked on later reads
                    llm.generate([PROMPT], GREEDY, use_tqdm=False)
            finally:
                repair(saved)


def _last_expert_region(folder: Path) -> dict:
    return max(json.loads((folder / INDEX_NAME).read_text())["experts"], key=lambda e: (e["file"], e["offset"]))


def test_file_cut_short_after_opening_is_an_error_not_zeros(copy):
    last = _last_expert_region(copy)
    with LLM(copy, expert_slots=8) as llm:
        llm.generate([PROMPT], GREEDY, use_tqdm=False)  # the weight file is open now
        os.truncate(copy / last["file"], last["offset"] + 4096)  # the last expert is cut off
        with pytest.raises(CheckpointError, match=re.escape(last["file"]) + r": truncated: tensor "
                           r"'model\.layers\.\d\.mlp\.experts\[\d\]' \(expert \d of layer \d\) needs bytes"):
            for _ in range(3):  # until a request routes to an expert past the cut
                llm.generate([PROMPT, "7+8=", "the cat"], GREEDY, use_tqdm=False)


def test_file_replaced_before_the_first_expert_read(copy):
    last = _last_expert_region(copy)
    with LLM(copy, expert_slots=8) as llm:  # the expert reader opens the file on its first read
        path = copy / last["file"]
        short = path.with_name("short.bin")
        short.write_bytes(path.read_bytes()[: last["offset"]])
        os.replace(short, path)
        with pytest.raises(CheckpointError, match=re.escape(last["file"]) + r": truncated: "):
            for _ in range(3):
                llm.generate([PROMPT, "7+8=", "the cat"], GREEDY, use_tqdm=False)


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_eio_is_an_error_naming_file_and_expert(copy, monkeypatch, direct):
    """EIO from the disk, on the O_DIRECT read of an uncached expert or on a buffered read (a
    filesystem that refuses O_DIRECT), is a CheckpointError naming the file and the expert."""
    import fcntl

    weights, real_open, real_preadv = str(copy / "weights-00001.bin"), os.open, os.preadv
    failed = []  # whether each failing read was an O_DIRECT one

    def no_direct_open(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    def eio(fd, buffers, offset, *rest):
        if os.readlink(f"/proc/self/fd/{fd}") == weights:
            failed.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT))
            raise OSError(errno.EIO, "Input/output error")
        return real_preadv(fd, buffers, offset, *rest)

    if not direct:
        monkeypatch.setattr(direct_io.os, "open", no_direct_open)
    with LLM(copy, expert_slots=8) as llm:
        os.sync()  # written by the copy: clean the pages, then drop them, so the reads go to the disk
        fd = os.open(weights, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        monkeypatch.setattr(direct_io.os, "preadv", eio)
        with pytest.raises(CheckpointError, match=r"weights-00001\.bin: cannot read tensor 'model\.layers\.\d\.mlp"
                                                  r"\.experts\[\d\]' \(expert \d of layer \d\) \(bytes \d+\.\.\d+: \[Errno 5\]"):
            llm.generate([PROMPT], GREEDY, use_tqdm=False)
        monkeypatch.setattr(direct_io.os, "preadv", real_preadv)
    if direct and not any(failed):
        pytest.skip("this filesystem refuses O_DIRECT: only buffered reads were exercised")
    assert failed and (any(failed) if direct else not any(failed))


# -- the server and batch jobs ----------------------------------------------------------------------


def test_server_fails_the_request_and_keeps_serving(copy, clean):
    import http.client

    from live_server import KEY, LiveServer, raw_call

    damage(copy)
    # 8 MiB is less than either folder's weights: both are served offloaded (the damage is in experts)
    srv = LiveServer("--model", f"bad={copy}", "--model", f"good={clean}", "--host-memory", "8MiB")
    try:
        body = json.dumps({"model": "bad", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}).encode()
        status, got = raw_call(srv, "POST", "/v1/completions", body)
        assert status == 500 and set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}
        assert got["error"]["type"] == "server_error" and got["error"]["code"] == "checkpoint_error"
        assert re.search(_expert_error(), got["error"]["message"]), got
        good = json.dumps({"model": "good", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}).encode()
        status, got = raw_call(srv, "POST", "/v1/completions", good)
        assert status == 200 and got["choices"][0]["text"].strip() == "46"
        status, got = raw_call(srv, "POST", "/v1/completions", body)  # the bad model fails again, the same way
        assert status == 500 and got["error"]["code"] == "checkpoint_error"
        # streamed: the headers are out when the step fails, so the error comes as the stream's last event
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({**json.loads(body), "stream": True}),
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        events = [x[6:] for x in conn.getresponse().read().decode().split("\n\n") if x.startswith("data: ")]
        conn.close()
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "checkpoint_error"
        assert re.search(_expert_error(), json.loads(events[-2])["error"]["message"])
        assert srv.proc.poll() is None and srv.health()["status"] == "ok"
    finally:
        srv.stop()


def _batch_input(path: Path, n: int = 4) -> Path:
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"prompt": f"{i}+{i}=", "max_tokens": 3, "temperature": 0}})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_batch_writes_error_lines_and_a_rerun_answers_them(copy, clean, tmp_path):
    inp = _batch_input(tmp_path / "in.jsonl")
    with LLM(clean, expert_slots=8) as llm:
        llm.machine_profile = fixed_machine_profile()
        run_batch(llm, inp, tmp_path / "want.jsonl", use_tqdm=False)
    want = {e["custom_id"]: e["response"]["body"]["choices"][0]["text"]
            for e in map(json.loads, (tmp_path / "want.jsonl").read_text().splitlines())}

    saved = damage(copy)
    out = tmp_path / "out.jsonl"
    with LLM(copy, expert_slots=8) as llm:
        llm.machine_profile = fixed_machine_profile()
        summary = run_batch(llm, inp, out, use_tqdm=False)
        entries = [json.loads(x) for x in out.read_text().splitlines()]
        assert summary["errors"] == 4 and re.search(_expert_error(), summary["checkpoint_error"])
        assert sorted(e["custom_id"] for e in entries) == ["r0", "r1", "r2", "r3"]
        for e in entries:
            assert e["response"] is None and e["error"]["code"] == "checkpoint_error"
            assert re.search(r"line \d: generation failed: the model's checkpoint is damaged: .*" + _expert_error(),
                             e["error"]["message"])
        repair(saved)  # the same process, the same output: the failed requests run again, answered once each
        summary = run_batch(llm, inp, out, use_tqdm=False)
    entries = [json.loads(x) for x in out.read_text().splitlines()]
    assert summary["written"] == 4 and "checkpoint_error" not in summary
    assert {e["custom_id"]: e["response"]["body"]["choices"][0]["text"] for e in entries} == want


def test_cli_batch_on_a_corrupt_checkpoint_exits_1(copy, tmp_path, capsys):
    damage(copy)
    inp, out = _batch_input(tmp_path / "in.jsonl", 2), tmp_path / "out.jsonl"
    assert main(["batch", "--model", str(copy), "--device-memory", "6MiB", "--input", str(inp),
                 "--output", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"moetier: error: the run stopped on a damaged checkpoint: .*" + _expert_error(), err)
    assert [json.loads(x)["error"]["code"] for x in out.read_text().splitlines()] == ["checkpoint_error"] * 2
    # with the checks off the job runs (on the damaged bytes) and exits 0
    assert main(["batch", "--model", str(copy), "--device-memory", "6MiB", "--input", str(inp),
                 "--output", str(tmp_path / "off.jsonl"), "--quiet", "--verify", "off"]) == 0


def test_a_failed_step_fails_its_requests_and_the_waiting_ones_run(clean, monkeypatch):
    """The server's engine thread: a read error (one EIO) fails the request whose step needed the
    expert; a request still waiting then runs and gets the right answer."""
    from moetier.serve.worker import EngineWorker

    llm = LLM(clean, expert_slots=8, prefetch="none", max_num_seqs=1)  # one sequence per step
    real, failures = os.preadv, []

    def eio_once(fd, buffers, offset, *rest):
        if not failures and os.readlink(f"/proc/self/fd/{fd}").startswith(str(clean)):
            failures.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset, *rest)

    monkeypatch.setattr(direct_io.os, "preadv", eio_once)
    worker = EngineWorker(llm)
    ids = llm.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=4, temperature=0)
    _, first = worker.submit(ids, params)
    _, second = worker.submit(ids, params)  # both queued before the engine thread starts: one step, one waits
    worker.start()
    def messages(q) -> list:
        out = [q.get(timeout=60)]
        while out[-1][0] not in ("done", "error"):
            out.append(q.get(timeout=60))
        return out

    try:
        got = messages(first)
        assert [k for k, _ in got] == ["started", "error"]
        assert isinstance(got[-1][1], CheckpointError) and "Errno 5" in str(got[-1][1])
        got = messages(second)
        assert got[0][0] == "started" and got[-1][0] == "done", got
        assert got[-1][1].outs[0].text.strip() == "46"
    finally:
        worker.stop(wait=30)
        llm.close()


def test_host_tier_keeps_no_damaged_expert(copy):
    """Through the host tier (disk > host > slot): the damaged expert's read fails, the host tier
    does not hold it, and once repaired the same store serves it."""
    import torch

    from moetier.experts.cache import LRUPolicy
    from moetier.experts.sources import PackedSource
    from moetier.experts.store import ExpertStore
    from moetier.weights.packed import PackedCheckpoint

    saved = damage(copy)
    with PackedCheckpoint(copy) as ck:
        store = ExpertStore(PackedSource(ck, [0, 1, 2, 3]), num_slots=8, policy=LRUPolicy(), threads=2, host_slots=4)
        try:
            assert store.acquire(0, [3])  # an undamaged layer
            store.release(0)
            with pytest.raises(CheckpointError, match=_expert_error()):
                store.acquire(LAYER, [2])
            assert not store.host.holds((LAYER, 2)) and (LAYER, 2) not in store.resident()
            repair(saved)
            gu, dn = store.acquire(LAYER, [2])[2]
            want_gu, want_dn = ck.read_expert(LAYER, 2, verify=True)
            assert torch.equal(gu, want_gu) and torch.equal(dn, want_dn)
            store.release(LAYER)
        finally:
            store.close()
