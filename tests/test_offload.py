"""Offloaded experts: same output as all-resident for every family, policy and budget; budgets hold."""

import json
import subprocess
import sys
import textwrap

import pytest

from moetier import LLM, SamplingParams
from moetier.errors import MoetierError
from moetier.experts.setup import moe_blocks
from tiny import FAMILY_CONFIGS, make_checkpoint

PROMPTS = [[5, 17, 99, 3, 42, 42, 7, 120], [64, 1, 88], list(range(30, 50))]
PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)


def _run(llm):
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    # tokens and the exact float logprob of each: equal only if every logit is bit-identical
    return [(o.outputs[0].token_ids, [lp["logprob"] for lp in o.outputs[0].logprobs]) for o in outs]


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def family(request, tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param, FAMILY_CONFIGS[request.param])
    resident = LLM(folder, dtype="float32")
    return folder, _run(resident), resident


@pytest.mark.parametrize("policy", ["lru", "lfu", "activation"])
@pytest.mark.parametrize("prefetch", ["trace", "lookahead", "none"])
def test_offloaded_output_is_bit_identical(family, policy, prefetch, tmp_path):
    folder, want, resident = family
    experts = moe_blocks(resident.model)[0].experts.num_experts
    for slots in (experts, experts + 3):  # the minimum (one layer's experts), and a little more
        llm = LLM(folder, dtype="float32", expert_slots=slots, offload_dir=tmp_path,
                  cache_policy=policy, prefetch=prefetch)
        try:
            assert _run(llm) == want
            assert _run(llm) == want  # again, with a warm cache and a trace library
            s = llm.stats()
            assert s["misses"] > 0 and s["bytes_disk_to_host"] > 0
            store = llm.engine.offload.store
            assert llm.memory["device_bytes"] <= llm.memory["device_budget"]
            assert len(store.resident()) <= store.num_slots
        finally:
            llm.close()


def test_generous_budget_behaves_like_resident(family, tmp_path):
    folder, want, _ = family
    llm = LLM(folder, dtype="float32", device_memory="1GiB", offload_dir=tmp_path)
    try:
        assert _run(llm) == want
        before = llm.stats()["misses"]
        _run(llm)
        assert llm.stats()["misses"] == before  # every expert stayed resident
    finally:
        llm.close()


def test_too_small_budget_says_the_minimum(family, tmp_path):
    folder, _, _ = family
    with pytest.raises(MoetierError, match=r"device_memory .* is too small: .* give at least \d"):
        LLM(folder, dtype="float32", device_memory="64KiB", offload_dir=tmp_path)


def test_trace_library_is_persisted(family, tmp_path):
    folder, want, _ = family
    llm = LLM(folder, dtype="float32", expert_slots=9, offload_dir=tmp_path)
    _run(llm)
    llm.close()
    assert (tmp_path / "traces.npz").exists()
    again = LLM(folder, dtype="float32", expert_slots=9, offload_dir=tmp_path)
    try:
        assert len(again.engine.offload.library) > 0
        assert _run(again) == want
    finally:
        again.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_rss_stays_near_dense_plus_budget(tmp_path):
    """A model whose experts are several times the budget runs within it (process RSS)."""
    cfg = dict(FAMILY_CONFIGS["mixtral"], hidden_size=256, intermediate_size=1024, num_local_experts=16,
               num_hidden_layers=4)
    folder = make_checkpoint(tmp_path / "big", "mixtral", cfg)
    script = textwrap.dedent(f"""
        import json, re
        def rss():
            return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
        import torch
        from pathlib import Path
        from moetier import LLM, SamplingParams
        from moetier.weights.loader import load_args
        import moetier.experts.setup
        # warm up: imports and torch's one-time set-up cost the same whatever the model's size
        family, args, _ = load_args(Path({str(folder)!r}))
        with torch.device("meta"):
            family.build(args)
        base = rss()
        llm = LLM({str(folder)!r}, dtype="float32", expert_slots=18, offload_dir={str(tmp_path / 'off')!r})
        llm.generate([{{"prompt_token_ids": list(range(1, 40))}}], SamplingParams(max_tokens=24, ignore_eos=True))
        print(json.dumps({{"grew": rss() - base, **llm.memory}}))
    """)
    # convert first, in its own process, so its buffers are not counted
    subprocess.run([sys.executable, "-c", f"from moetier import LLM; LLM({str(folder)!r}, dtype='float32', "
                    f"expert_slots=18, offload_dir={str(tmp_path / 'off')!r}).close()"], check=True)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    m = json.loads(r.stdout.strip().splitlines()[-1])
    experts_total = 4 * 16 * 3 * 256 * 1024 * 4
    assert m["device_budget"] < experts_total / 3  # the experts really do not fit
    # growth: dense + slots + KV + allocator slack, far below the experts' size
    assert m["grew"] < m["device_budget"] + 32 * 2**20, m
