"""moetier batch on a Ray cluster (two nodes on loopback): the same answers as the local batch,
every custom_id answered once when a replica's process is killed mid-job, a clean failure and
resume when no replica can start, the CLI."""

import json
import os
import signal

import pytest

from moetier.batch_file import run_batch
from moetier.cli import main
from moetier.cluster.batch import run_batch_ray
from moetier.errors import MoetierError
from moetier.llm import LLM
from procs import titled
from test_batch_file import _answers as answers_of, _read, folder  # noqa: F401 - folder: the tiny model fixture
from tiny import fixed_machine_profile

PROFILE = fixed_machine_profile()


def _line(cid, url="/v1/completions", **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def _requests(n):
    """Completions and chats, greedy and seeded sampling, of different lengths (they finish apart)."""
    out = []
    for i in range(n):
        if i % 3 == 1:
            out.append(_line(f"chat-{i}", "/v1/chat/completions", messages=[{"role": "user", "content": "hi " * i}],
                             max_tokens=4 + 8 * (i % 3), temperature=0.8, seed=i))
        else:
            out.append(_line(f"cmpl-{i}", prompt="abc" * (1 + i % 4), max_tokens=4 + 8 * (i % 3), temperature=0,
                             ignore_eos=True))
    return out


def _answers(entries):
    assert all(e["response"] is not None for e in entries), entries
    return answers_of(entries)


@pytest.fixture(scope="module")
def job(folder, tmp_path_factory):
    """An input file and its answers from the local batch (this process, one engine)."""
    d = tmp_path_factory.mktemp("ray-job")
    inp = d / "in.jsonl"
    inp.write_text("\n".join(_requests(12)) + "\n")
    llm = LLM(folder, dtype="float32")
    llm.machine_profile = PROFILE
    try:
        run_batch(llm, inp, d / "local.jsonl", use_tqdm=False)
    finally:
        llm.close()
    want = _answers(_read(d / "local.jsonl"))
    assert len(want) == 12
    return inp, want


def _options(folder):
    return {"model": str(folder), "dtype": "float32"}


def test_two_replicas_one_per_node_give_the_local_answers(ray_cluster, folder, job, tmp_path):
    inp, want = job
    out = tmp_path / "out.jsonl"
    summary = run_batch_ray(inp, out, _options(folder), replicas="auto", chunk_size=3, use_tqdm=False,
                            machine_profile=PROFILE, threads=1)
    entries = _read(out)
    assert [e["custom_id"] for e in entries].count("cmpl-0") == 1 and len(entries) == 12
    assert _answers(entries) == want
    reps = summary["replicas"]
    assert len(reps) == 2 and len({r["node_id"] for r in reps}) == 2  # one replica on each node
    assert {r["node_ip"] for r in reps} == {"127.0.0.1"}
    assert sum(r["requests"] for r in reps) == 12 and summary["retries"] == 0 and summary["replicas_lost"] == 0
    assert summary["completion_tokens"] == sum(e["response"]["body"]["usage"]["completion_tokens"] for e in entries)
    # a rerun has nothing left to do and starts no replica
    again = run_batch_ray(inp, out, _options(folder), replicas=2, use_tqdm=False)
    assert again["already_done"] == 12 and again["written"] == 0 and len(_read(out)) == 12


def test_a_replica_killed_mid_job_still_answers_every_request_once(ray_cluster, folder, job, tmp_path):
    inp, want = job
    out = tmp_path / "out.jsonl"
    killed = []

    def kill_the_first_answerer(entry, replica):
        if not killed:
            assert replica["pid"] in titled(b"ray::MoetierReplica")  # ps names it
            os.kill(replica["pid"], signal.SIGKILL)
            killed.append(replica["name"])

    summary = run_batch_ray(inp, out, _options(folder), replicas=2, chunk_size=3, use_tqdm=False,
                            machine_profile=PROFILE, threads=1, on_result=kill_the_first_answerer)
    entries = _read(out)
    ids = [e["custom_id"] for e in entries]
    assert len(ids) == len(set(ids)) == 12
    assert _answers(entries) == want
    assert summary["replicas_lost"] == 1 and summary["retries"] >= 1
    by_name = {r["name"]: r for r in summary["replicas"]}
    assert by_name[killed[0]]["lost"] == 1
    assert sum(r["requests"] for r in summary["replicas"]) == 12


def test_no_replica_can_start_fails_cleanly_and_a_rerun_resumes(ray_cluster, folder, job, tmp_path):
    inp, want = job
    out = tmp_path / "out.jsonl"
    bad = dict(_options(folder), max_model_len=-5)  # every replica's engine refuses it
    with pytest.raises(MoetierError, match="no replica could be kept alive"):
        run_batch_ray(inp, out, bad, replicas=1, use_tqdm=False, max_restarts=1, threads=1)
    assert not out.exists() or out.read_text() == ""
    # through the CLI, on the cluster this process is connected to, with one replica
    args = ["batch", "--model", str(folder), "--dtype", "float32", "--input", str(inp), "--output", str(out),
            "--ray", ray_cluster.address, "--replicas", "1", "--threads", "1", "--quiet"]
    assert main(args) == 0
    entries = _read(out)
    assert _answers(entries) == want
    assert main(args + ["--replicas", "0"]) == 1


def test_importing_moetier_does_not_import_ray():
    import subprocess
    import sys

    code = "import sys, moetier, moetier.cli, moetier.batch_file; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
