"""Throughput runner and planner: same tokens as the latency engine, budgets held, store restored."""

import dataclasses

import pytest
import torch

from moetier import LLM, SamplingParams
from moetier.errors import MoetierError
from moetier.runtime.planner import Job, ModelCost, Planner
from moetier.runtime.machine import MachineProfile
from tiny import FAMILY_CONFIGS, add_char_tokenizer, fixed_machine_profile, make_checkpoint

PROFILE = fixed_machine_profile()


pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(tmp_path_factory, family):
    cfg = dict(FAMILY_CONFIGS[family], vocab_size=97, eos_token_id=1, bos_token_id=0, pad_token_id=0)
    folder = make_checkpoint(tmp_path_factory.mktemp(family), family, cfg)
    add_char_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return _checkpoint(tmp_path_factory, "mixtral")


def _llm(folder, **kw):
    llm = LLM(folder, dtype="float32", **kw)
    llm.machine_profile = PROFILE
    return llm


TEXTS = ["hello", "a", "the quick brown fox jumps", "0123456789" * 4, "MoE!", "zz top", "x" * 17, "abcabc",
         "Lorem ipsum dolor sit amet", "?", "batching", "no padding here"]


def _params():
    """Per-request params: greedy, seeded sampling with top-p/top-k, stop strings, n=2, logprobs, min_tokens."""
    out = []
    for i in range(len(TEXTS)):
        kind = i % 6
        if kind == 0:
            p = SamplingParams(max_tokens=6 + i, temperature=0)
        elif kind == 1:
            p = SamplingParams(max_tokens=9, temperature=0.9, top_p=0.8, seed=100 + i)
        elif kind == 2:
            p = SamplingParams(max_tokens=12, temperature=1.3, top_k=5, seed=i, stop=["e", "Q"])
        elif kind == 3:
            p = SamplingParams(n=2, max_tokens=7, temperature=1.0, seed=7 * i, logprobs=2)
        elif kind == 4:
            p = SamplingParams(max_tokens=10, temperature=0, stop=["aa"], include_stop_str_in_output=True, min_tokens=2)
        else:
            p = SamplingParams(max_tokens=8, temperature=0.7, seed=i, ignore_eos=True)
        out.append(p)
    return out


def _params_with_stops(llm):
    """_params(), with stop strings taken from what each such request generates without them."""
    params = _params()
    for i, p in enumerate(params):
        if p.stop:
            text = llm.generate([TEXTS[i]], [dataclasses.replace(p, stop=None)], mode="latency",
                                use_tqdm=False)[0].outputs[0].text
            if len(text) >= 4:
                params[i] = dataclasses.replace(p, stop=[text[2:4], "Q"])
    return params


def _view(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


def _logprobs(outs):
    return [[lp["logprob"] for c in o.outputs for lp in (c.logprobs or [])] for o in outs]


def _with_common_eos(llm, texts):
    """Make a token the greedy runs really produce an EOS, so that some sequences stop early."""
    full = llm.generate(texts[:1], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), mode="latency",
                        use_tqdm=False)[0].outputs[0].token_ids
    llm.engine.eos = {1, full[3]}


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "llama4_text"])
def test_same_tokens_as_latency_runner(family, tmp_path_factory):
    llm = _llm(_checkpoint(tmp_path_factory, family))
    _with_common_eos(llm, TEXTS)
    params = _params_with_stops(llm)
    want = llm.generate(TEXTS, params, mode="latency", use_tqdm=False)
    got = llm.generate(TEXTS, params, mode="throughput", use_tqdm=False)
    assert _view(got) == _view(want)
    assert any(c.finish_reason == "stop" and c.stop_reason is None for o in want for c in o.outputs)  # EOS hit
    assert any(isinstance(c.stop_reason, str) for o in want for c in o.outputs)  # a stop string hit
    for a, b in zip(_logprobs(got), _logprobs(want)):
        assert a == pytest.approx(b, abs=1e-4)
    # a cramped plan: prompts cut into 5-token chunks, at most 3 sequences per pass (joining as others leave)
    plan = dataclasses.replace(llm.plan(TEXTS, params), max_seqs=3, prefill_tokens=5)
    got = llm.generate(TEXTS, params, plan=plan, use_tqdm=False)
    assert _view(got) == _view(want)
    assert llm.last_run["peak_seqs"] <= 3 and llm.last_run["passes"] > max(len(t) for t in TEXTS) // 5


def test_one_at_a_time_equals_throughput(mixtral):
    llm = _llm(mixtral)
    params = _params()
    single = [llm.generate([t], [p], mode="latency", use_tqdm=False)[0] for t, p in zip(TEXTS, params)]
    assert _view(llm.generate(TEXTS, params, mode="throughput", use_tqdm=False)) == _view(single)


def test_kv_budget_bounds_the_running_sequences(mixtral):
    llm = _llm(mixtral)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = llm.generate(TEXTS, params, mode="latency", use_tqdm=False)
    plan = llm.plan(TEXTS, params)
    from moetier.experts.setup import kv_bytes_per_token

    per_tok = kv_bytes_per_token(llm.args, torch.float32)
    biggest = max(len(t) + 6 for t in TEXTS) * per_tok
    plan = dataclasses.replace(plan, kv_budget=3 * biggest, max_seqs=100)
    got = llm.generate(TEXTS, params, plan=plan, use_tqdm=False)
    assert _view(got) == _view(want)
    assert llm.last_run["peak_kv_reserved"] <= 3 * biggest
    assert 3 <= llm.last_run["peak_seqs"] < len(TEXTS)
    with pytest.raises(MoetierError, match="KV budget"):
        llm.generate(TEXTS, params, plan=dataclasses.replace(plan, kv_budget=biggest - 1), use_tqdm=False)


@pytest.mark.parametrize("memory", [dict(expert_slots=6), dict(expert_slots=9), dict(device_memory="3MiB")])
def test_offloaded_experts_same_tokens_and_read_once_per_pass(mixtral, memory, tmp_path):
    ref = _llm(mixtral)
    params = _params()
    want = _view(ref.generate(TEXTS, params, mode="latency", use_tqdm=False))
    llm = _llm(mixtral, offload_dir=tmp_path, **memory)
    try:
        store = llm.engine.offload.store
        slots, policy, prefetcher = store.num_slots, store.policy, llm.engine.offload.prefetcher
        assert _view(llm.generate(TEXTS, params, mode="throughput", use_tqdm=False)) == want
        run = llm.last_run
        layers, experts = llm.engine.offload.tracer.shape
        assert 0 < run["expert_bytes_read"] <= run["passes"] * layers * experts * store.layout.nbytes
        if "device_memory" in memory:  # the planner split the budget; everything it planned fits
            m = run["plan"]["memory"]
            assert m["dense"] + m["expert_slots"] + m["kv"] + m["activations"] <= m["budget"]
            assert run["peak_kv_reserved"] <= m["kv"]
        # the latency engine gets its store back as it was
        assert (store.num_slots, store.policy, llm.engine.offload.prefetcher) == (slots, policy, prefetcher)
        assert _view(llm.generate(TEXTS, params, mode="latency", use_tqdm=False)) == want
    finally:
        llm.close()


def test_stopping_early_restores_the_store(mixtral, tmp_path):
    llm = _llm(mixtral, offload_dir=tmp_path, device_memory="3MiB")
    try:
        store = llm.engine.offload.store
        slots, policy = store.num_slots, store.policy
        params = SamplingParams(max_tokens=5, temperature=0)
        for i, out in llm.iter_generate(TEXTS, params, mode="throughput"):
            assert out.finished
            break
        assert store.num_slots == slots and store.policy is policy
        want = LLM(mixtral, dtype="float32").generate(TEXTS, params, use_tqdm=False)
        assert _view(llm.generate(TEXTS, params, mode="throughput", use_tqdm=False)) == _view(want)
    finally:
        llm.close()


def test_auto_mode_uses_throughput_for_many_prompts(mixtral):
    llm = _llm(mixtral)
    params = SamplingParams(max_tokens=2, temperature=0)
    prompts = [{"prompt_token_ids": [2 + i % 90]} for i in range(64)]
    llm.generate(prompts[:63], params, use_tqdm=False)
    assert llm.last_run is None
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.last_run is not None and llm.last_run["sequences"] == 64
    assert [o.outputs[0].token_ids for o in outs] == \
        [o.outputs[0].token_ids for o in llm.generate(prompts, params, mode="latency", use_tqdm=False)]
    with pytest.raises(ValueError, match="unknown mode"):
        llm.generate(prompts, params, mode="fast")


# -- the planner, without running a model -----------------------------------------------------------------


def _cost(offloaded: bool) -> ModelCost:
    H, I, E, L, V = 256, 512, 8, 4, 1000
    expert = 3 * H * I
    dense = (L * (4 * H * H + E * H) + 2 * V * H) * 2 + (0 if offloaded else L * E * expert * 2)
    return ModelCost(linears=[H * H] * (4 * L) + [E * H] * L, head=V * H, moe_layers=L, experts=E, top_k=2,
                     expert_params=expert, layers=L, hidden=H, vocab=V, attn_flops_per_pair=2 * 8 * 64,
                     kv_bytes_per_token=L * 2 * 2 * 64 * 2, elem=2, dense_bytes=dense)


# decode-heavy, as generation jobs mostly are: per-pass weight reads are worth amortising
JOB = Job(prompt_lens=[16 + (37 * i) % 64 for i in range(500)], new_tokens=[128] * 500, max_len=1024)


def _kv_per_seq(cost, job):
    return sum(job.reserve_tokens(i) for i in range(job.n)) / job.n * cost.kv_bytes_per_token


def test_planner_fits_the_kv_budget_and_grows_with_it():
    cost = _cost(False)
    per_seq = _kv_per_seq(cost, JOB)
    plans = [Planner(cost, PROFILE, budget=cost.dense_bytes + int(k * per_seq) + (2 << 20)).plan(JOB)
             for k in (2, 8, 40, 400)]
    for p in plans:
        assert p.max_seqs * per_seq <= p.kv_budget
        m = p.memory
        assert m["dense"] + m["kv"] + m["activations"] <= m["budget"]
    seqs = [p.max_seqs for p in plans]
    rates = [p.predicted_tok_s for p in plans]
    assert seqs == sorted(seqs) and seqs[0] < seqs[-1]
    assert rates == sorted(rates) and rates[-1] > 1.5 * rates[0]
    assert "sequences per pass" in plans[-1].explain() and "predicted" in plans[-1].explain()
    # no budget: the KV budget given bounds it
    p = Planner(cost, PROFILE, kv_budget=int(5.5 * per_seq)).plan(JOB)
    assert p.max_seqs * per_seq <= p.kv_budget <= int(5.5 * per_seq)
    with pytest.raises(MoetierError, match="too small"):
        Planner(cost, PROFILE, budget=cost.dense_bytes + int(per_seq / 2)).plan(JOB)


def test_planner_splits_an_offload_budget_between_slots_and_kv():
    cost = _cost(True)
    slot = -(-cost.expert_bytes // 4096) * 4096
    per_seq = _kv_per_seq(cost, JOB)
    total = cost.moe_layers * cost.experts

    def plan(budget, read_bps=2e9):
        return Planner(cost, PROFILE, budget=budget, slot_bytes=slot, min_slots=cost.experts, max_slots=total,
                       read_bps=read_bps).plan(JOB)

    budgets = [cost.dense_bytes + k for k in (12 * slot + 64 * per_seq, total * slot // 2 + 256 * per_seq,
                                              total * slot + 600 * per_seq + (256 << 20))]
    plans = [plan(b) for b in budgets]
    for p in plans:
        m = p.memory
        assert cost.experts <= p.expert_slots <= total
        assert m["dense"] + m["expert_slots"] + m["kv"] + m["activations"] <= m["budget"]
        assert p.max_seqs * per_seq <= p.kv_budget
    assert plans[0].predicted_tok_s < plans[1].predicted_tok_s < plans[2].predicted_tok_s
    assert plans[-1].expert_slots == total and plans[-1].moved_bytes_per_pass == 0  # all fit: nothing moves
    assert plans[0].moved_bytes_per_pass > 0
    # slow reads make slots worth more than sequences
    slow, fast = plan(budgets[1], read_bps=1e8), plan(budgets[1], read_bps=1e11)
    assert slow.expert_slots >= fast.expert_slots
    with pytest.raises(MoetierError, match="too small"):
        plan(cost.dense_bytes + 4 * slot)


def test_machine_profile_is_cached(tmp_path, monkeypatch):
    calls = []
    fake = classmethod(lambda cls, dtype, device="cpu": calls.append(1) or PROFILE)
    monkeypatch.setattr(MachineProfile, "measure", fake)
    a = MachineProfile.load_or_measure(torch.float32, tmp_path)
    b = MachineProfile.load_or_measure(torch.float32, tmp_path)
    assert a == b == PROFILE and len(calls) == 1
    assert (tmp_path / "machine.json").exists()


def test_real_probes_are_quick_and_sane():
    import time

    t = time.perf_counter()
    prof = MachineProfile.measure(torch.float32)
    assert time.perf_counter() - t < 6  # < 2 s on an idle machine; this one is shared
    assert prof.matmul_flops > 1e8 and prof.stream_bps > 1e7 and prof.copy_bps > 1e7
    assert 0 < prof.op_s < prof.attn_call_s < 0.1


def test_planner_counts_the_float32_path_of_wide_matmuls():
    """A profile whose wide matmuls run 3x faster in float32 (bf16 on a CPU without AMX) predicts
    faster passes once a call's rows reach ``wide_rows``, and only then."""
    cost = _cost(False)
    wide = dataclasses.replace(PROFILE, wide_rows=64, wide_flops=3 * PROFILE.matmul_flops, upcast_bps=PROFILE.copy_bps)
    params = cost.linears[0]
    for rows in (1, 63):
        assert cost.matmul_s(rows, params, wide) == cost.matmul_s(rows, params, PROFILE)
    for rows in (64, 4096):
        assert cost.matmul_s(rows, params, wide) < cost.matmul_s(rows, params, PROFILE)
    budget = cost.dense_bytes + 400 * int(_kv_per_seq(cost, JOB))
    narrow, fast = (Planner(cost, p, budget=budget).plan(JOB) for p in (PROFILE, wide))
    assert fast.predicted_tok_s > narrow.predicted_tok_s
    assert fast.profile["wide_rows"] == 64 and "wide_rows" not in narrow.profile


def test_bf16_profile_measures_the_wide_path_when_it_has_one():
    from moetier.models.prepack import PROBE_ROWS

    prof = MachineProfile.measure(torch.bfloat16)
    assert prof.wide_rows == 0 or prof.wide_rows in PROBE_ROWS
    if prof.wide_rows:
        assert prof.wide_flops > 1e8 and prof.upcast_bps > 1e7
    assert MachineProfile.measure(torch.float32).wide_rows == 0  # float32 has nothing to upcast
