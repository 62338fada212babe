"""A RAM budget the whole process keeps: first-use conversion and generation inside a memory
cgroup of budget + moetier.ram.PROCESS_OVERHEAD (page cache counted, no swap), with a
checkpoint larger than that limit, give the tokens of the all-resident run without ever
reaching the limit (so without the kernel reclaiming page cache to keep the process in it)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moetier import LLM, SamplingParams
from moetier.errors import MoetierError
from moetier.ram import AUTO_MARGIN, PROCESS_OVERHEAD, auto_budget, cgroup_limit, resolve_budget
from tiny import FAMILY_CONFIGS, make_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _bench_cgroup():
    """bench/cgroup.py (the helper bench/latency.py --ram-limit uses), imported from its file."""
    spec = importlib.util.spec_from_file_location("bench_cgroup", ROOT / "bench" / "cgroup.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_cgroup"] = mod
    spec.loader.exec_module(mod)
    return mod


cg = _bench_cgroup()

CHILD = r"""
import json, sys
import torch
torch.set_num_threads(1)
from moetier import LLM, SamplingParams
src, off, budget, ids, n = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
llm = LLM(src, device_memory=int(budget) if budget.isdigit() else budget, offload_dir=off)
out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
print(json.dumps({"tokens": out[0].outputs[0].token_ids, "memory": llm.memory}))
"""

# float32, 10 MoE layers x 8 experts of 12 MiB: a 1 GB checkpoint, 1.5 times the limit below
CONFIG = dict(FAMILY_CONFIGS["mixtral"], hidden_size=512, intermediate_size=2048, num_hidden_layers=10,
              num_local_experts=8, num_experts_per_tok=2)
PROMPT = [5, 17, 3, 99, 42, 8, 64, 23]
NEW = 6


def _child(src: Path, off: Path, budget, limit: int):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return cg.run_limited([sys.executable, "-c", CHILD, str(src), str(off), str(budget), json.dumps(PROMPT), str(NEW)],
                          limit, timeout=120, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    ok, why = cg.cgroup_support()
    if not ok:
        pytest.skip(f"no writable memory cgroup on this machine: {why}")
    torch.set_num_threads(1)
    from transformers.initialization import no_init_weights

    with no_init_weights():  # make_checkpoint draws every parameter itself; skip transformers' init (seconds)
        folder = make_checkpoint(tmp_path_factory.mktemp("ram"), "mixtral", CONFIG)
    with torch.no_grad():
        ref = LLM(folder).generate([{"prompt_token_ids": PROMPT}],
                                   SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))
    # one offload folder for the module: the first test converts into it, the next reuse it
    return folder, ref[0].outputs[0].token_ids, tmp_path_factory.mktemp("off")


def test_convert_and_generate_fit_budget_plus_overhead(big):
    folder, want, off = big
    model_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    expert = 3 * CONFIG["hidden_size"] * CONFIG["intermediate_size"] * 4
    budget = 10 * expert + (32 << 20)  # dense weights (~11 MiB) + KV reserve (~20 MiB) + 10 slots
    limit = budget + PROCESS_OVERHEAD
    assert model_bytes > limit * 1.4  # neither the checkpoint nor its packed copy fits, cached or not
    r = _child(folder, off, budget, limit)
    detail = f"rc {r.returncode}, peak {r.peak_bytes}, oom {r.oom_killed}, stderr: {r.stderr[-1500:]}"
    assert not r.oom_killed and not r.timed_out and r.returncode == 0, detail
    # never at the limit: nothing leaned on the kernel reclaiming page cache to stay within it
    # (a convert that reads through mmap and leaves what it writes cached reaches the limit here)
    assert not r.reached_limit, detail
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["memory"]["expert_slots"] <= 10
    assert got["tokens"] == want
    assert (off / "packed-float32").is_dir()  # it converted inside the limit


def test_auto_budget_reads_the_cgroup_limit(big):
    """In a cgroup of 700 MiB, ``auto`` is the limit less the margin, and the run fits in it."""
    folder, want, off = big
    limit = 700 << 20
    r = _child(folder, off, "auto", limit)
    assert not r.oom_killed and r.returncode == 0 and not r.reached_limit, (r.peak_bytes, r.stderr[-1500:])
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["memory"]["device_budget"] == limit - AUTO_MARGIN
    assert got["tokens"] == want


def test_auto_budget_outside_any_limit_is_below_available_ram():
    from moetier.ram import available_ram

    avail, limit = available_ram(), cgroup_limit()
    budget = auto_budget()
    assert budget <= min(x for x in (avail, limit) if x is not None) - AUTO_MARGIN + (64 << 20)  # RAM moves
    assert resolve_budget("auto") > 0 and resolve_budget("3GiB") == 3 << 30 and resolve_budget(None) is None


def test_auto_budget_is_a_cpu_budget():
    with pytest.raises(MoetierError, match="auto"):
        resolve_budget("auto", device="cuda")


def test_cli_device_memory_auto_offloads_with_the_same_text(tmp_path):
    want = LLM("demo").generate(["12+34="], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    r = subprocess.run(
        [sys.executable, "-m", "moetier", "generate", "--model", "demo", "--prompt", "12+34=", "--max-tokens", "6",
         "--ignore-eos", "--device-memory", "auto", "--offload-dir", str(tmp_path), "--stats"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "[stats] expert hits" in r.stderr  # offloaded, not resident
    assert r.stdout == "12+34=" + want[0].outputs[0].text + "\n"
