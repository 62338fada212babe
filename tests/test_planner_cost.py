"""The throughput planner's cost model: expert loads through the slots, fixed costs, and what it says
when it cannot predict. No timing asserts: the expected values come from the real expert store
driven as a throughput pass drives it, or from the cost model's parts that must differ."""

import os
from concurrent.futures import wait
from types import SimpleNamespace

import pytest
import torch

from moetier.experts.cache import LRUPolicy
from moetier.experts.sources import TensorSource
from moetier.experts.store import ExpertStore
from moetier.runtime.machine import MachineProfile, Transfer, cached_experts
from moetier.runtime.planner import Job, ModelCost, PassShape, Planner
from moetier.runtime.throughput_offload import scan_offload
from tiny import fixed_machine_profile

L, E, K, H, I = 4, 8, 2, 16, 24  # MoE layers, experts per layer, top-k, hidden, expert intermediate


def _cost(layers: int = L) -> ModelCost:
    return ModelCost(linears=[H * H] * (4 * layers) + [E * H] * layers, head=100 * H, moe_layers=layers, experts=E,
                     top_k=K, expert_params=3 * H * I, layers=layers, hidden=H, vocab=100,
                     attn_flops_per_pair=2 * 4 * 8, kv_bytes_per_token=layers * 2 * 2 * 8 * 4, elem=4,
                     dense_bytes=1 << 20)


class _AllExperts(torch.nn.Module):
    """A router that sends the E/2 tokens of a pass to every expert once each (top-2)."""

    def forward(self, x):
        ids = torch.arange(E).view(E // K, K)
        return torch.ones(ids.shape), ids


def _store_loads(slots: int, passes: int, L: int = L) -> int:
    """Expert loads the real store makes over ``passes`` throughput passes that use every expert of
    every layer: the scan policy and prefetcher as the throughput runner installs them."""
    g = torch.Generator().manual_seed(0)
    source = TensorSource([torch.randn(E, 2 * I, H, generator=g) for _ in range(L)],
                          [torch.randn(E, H, I, generator=g) for _ in range(L)])
    store = ExpertStore(source, slots, LRUPolicy(), threads=2)
    routers = [_AllExperts() for _ in range(L)]
    offload = SimpleNamespace(store=store, tracer=SimpleNamespace(shape=(L, E)),
                              prefetcher=SimpleNamespace(routers=routers))
    x = torch.zeros(E // K, H)
    with scan_offload(offload) as rt:
        for _ in range(passes):
            for layer in range(L):  # what OffloadedExperts.forward does in each MoE layer
                _, ids = routers[layer](x)
                rt.tracer.record(layer, ids)
                store.acquire(layer, torch.unique(ids).tolist())
                rt.prefetcher.on_layer(layer, x)
                wait(list(store._loading.values()))  # the layer's math outlasts its prefetches: no races
                store.release(layer)
            store.end_step()
    store.close()  # waits for loads in flight
    return store.stats.bytes_disk_to_host // source.layout.nbytes


@pytest.mark.parametrize("layers,slots", [(4, E), (4, 2 * E), (4, 2 * E + 4), (4, 3 * E), (4, 4 * E - 1),
                                          (4, 4 * E), (8, 2 * E + 4), (8, 4 * E), (8, 6 * E), (8, 8 * E - 2)])
def test_loads_per_pass_follow_the_store_under_the_scan_policy(layers, slots):
    """Steady-state loads per pass of the real store (the difference between a 6- and a 2-pass run,
    so the first pass's cold loads cancel) against the planner's count, for passes that use every
    expert of every layer: within 8 %, exact where all or nothing is read again."""
    measured = (_store_loads(slots, 6, layers) - _store_loads(slots, 2, layers)) / 4
    planner = Planner(_cost(layers), fixed_machine_profile(), kv_budget=1 << 30, slot_bytes=4096, min_slots=E,
                      max_slots=slots, read_bps=1e9)
    tokens = 10_000  # so many tokens that every expert of every layer is hit
    predicted = planner.loads_per_pass(slots, tokens)
    if measured in (0, layers * E):
        assert predicted == pytest.approx(measured, abs=1e-6)
    else:
        assert predicted == pytest.approx(measured, rel=0.08)
    assert planner.moved_per_pass(slots, tokens) == pytest.approx(predicted * 3 * H * I * 4, rel=1e-9)


def test_loads_per_pass_by_hand():
    """The store's counts for 4 layers of 8 experts (the test above), written out: one or two layers
    of slots read all 32 experts each pass, 24 slots read 16, 28 read 8, 32 read none; resident
    experts read nothing; one token routes to top-2 of each layer's experts."""
    planner = Planner(_cost(), fixed_machine_profile(), kv_budget=1 << 30, slot_bytes=4096, min_slots=E,
                      max_slots=L * E, read_bps=1e9)
    assert [round(planner.loads_per_pass(s, 10_000), 6) for s in (8, 16, 24, 28, 32)] == [32, 32, 16, 8, 0]
    assert planner.loads_per_pass(None, 10_000) == 0
    assert planner.loads_per_pass(8, 1) == pytest.approx(L * K)


def test_decoding_sequences_cost_one_attention_call_per_layer():
    """Prompt chunks attend one call each; decoding sequences attend together on the KV pool in one
    call per layer. A pass of 32 decoding sequences therefore costs 32 chunk calls less one pooled
    call per layer than the same pass counted as 32 prompt chunks."""
    import dataclasses

    prof = dataclasses.replace(fixed_machine_profile(), attn_call_s=1e-3, attn_group_s=5e-3)
    cost = _cost()
    shape = dict(tokens=32, rows=32, seqs=32, pairs=32 * 40, ctx=32 * 40)
    grouped = cost.pass_time(PassShape(**shape, decode=32), 0, prof, None)["attention"]
    apart = cost.pass_time(PassShape(**shape, decode=0), 0, prof, None)["attention"]
    assert apart - grouped == pytest.approx(L * (32 * 1e-3 - 5e-3))


def test_matmul_calls_pay_a_fixed_cost_each():
    """An expert is two matmul calls: with a call cost and infinitely fast arithmetic, a pass with
    every expert of every layer hit pays 2 x L x E calls for its experts."""
    import dataclasses

    inf = float("inf")
    prof = dataclasses.replace(fixed_machine_profile(), matmul_flops=inf, stream_bps=inf, copy_bps=inf,
                               linear_call_s=1e-5, expert_call_s=0.0, moe_call_s=0.0)
    cost = _cost()
    parts = cost.pass_time(PassShape(tokens=10_000, rows=0, seqs=1, pairs=0, ctx=0), 0, prof, None)
    assert parts["experts"] == pytest.approx(2 * L * E * 1e-5, rel=1e-6)
    assert parts["dense"] == pytest.approx(len(cost.linears) * 1e-5)


def test_a_smaller_cpu_share_stretches_compute_not_reads():
    """The profile's rates are CPU time: with half the CPU, a pass's compute takes twice as long on the
    wall clock, while its expert reads (measured on the wall clock) take as long as before."""
    prof, cost = fixed_machine_profile(), _cost()
    shape = PassShape(tokens=64, rows=64, seqs=64, pairs=64 * 40, ctx=64 * 40, decode=64)
    full = cost.pass_time(shape, 1e6, prof, 1e8, overlap=0.0)
    half = cost.pass_time(shape, 1e6, prof, 1e8, overlap=0.0, cpu_share=0.5)
    assert half["compute"] == pytest.approx(2 * full["compute"]) and half["transfer"] == full["transfer"] == 0.01
    assert half["total"] == pytest.approx(2 * full["compute"] + 0.01)


JOB = Job(prompt_lens=[8] * 64, new_tokens=[32] * 64, max_len=128, stops_early=False)


def _offload_planner(**kw) -> Planner:
    return Planner(_cost(), fixed_machine_profile(), kv_budget=1 << 30, slot_bytes=4096, min_slots=E,
                   max_slots=E, read_bps=1e9, **kw)


def test_explain_says_plainly_when_it_cannot_predict():
    quiet = _offload_planner(load=(0.3, 2)).plan(JOB)
    assert quiet.unreliable == [] and "not reliable" not in quiet.explain()
    assert f"expert loads per pass: {L * E}.0" in quiet.explain()

    busy_plan = _offload_planner(load=(9.5, 2)).plan(JOB)
    busy = busy_plan.explain()
    assert "the prediction is not reliable here" in busy and "busy (load average 9.5 on 2 CPUs)" in busy
    assert busy_plan.caveats == ["busy machine"]  # the progress line's few words

    early = _offload_planner(load=(0.3, 2)).plan(Job(JOB.prompt_lens, JOB.new_tokens, JOB.max_len)).explain()
    assert "not reliable" in early and "runs to max_tokens" in early and "predicted_tok_s_for_passes_run" in early

    crowded = _offload_planner(load=(0.3, 1)).plan(JOB).explain()  # one torch thread on one CPU, plus loaders
    assert "not reliable" in crowded and "torch runs 1 threads on 1 CPU(s)" in crowded

    buffered = Transfer(read_bps=1e9, overlap=0.5, cached=0, experts=L * E, direct=False)
    text = _offload_planner(load=(0.3, 2), transfer=buffered).plan(JOB).explain()
    assert "not reliable" in text and "buffered" in text and "from the disk by buffered reads" in text


def test_transfer_says_where_reads_come_from():
    assert Transfer(1e9, 1.0, 32, 32, True).where() == "the page cache (all 32 experts' bytes cached)"
    assert Transfer(1e9, 1.0, 0, 32, True).where().startswith("the disk by O_DIRECT")
    assert Transfer(1e9, 1.0, 5, 32, True).where() == ("the page cache for 5 of 32 experts, the disk by O_DIRECT "
                                                        "for the rest")
    assert "unknown" in Transfer(1e9, 1.0, None, 32, True).where()


def test_cached_experts_sees_the_page_cache(tmp_path):
    """A packed file just read through the page cache is all cached; a source that is not a packed
    file cannot be asked."""
    from moetier.demo import demo_path
    from moetier.experts.sources import PackedSource
    from moetier.weights.packed import PackedCheckpoint
    from moetier.weights.packed_write import convert

    out = tmp_path / "packed"
    convert(demo_path(), out)
    for f in out.glob("*.bin"):
        with open(f, "rb") as fh:
            while fh.read(1 << 20):
                pass
    packed = PackedCheckpoint(out)
    try:
        source = PackedSource(packed, list(range(4)))
        cached = cached_experts(source, 4, 8)
        if cached is None:
            pytest.skip("mincore is not available here")
        assert cached == {(layer, e) for layer in range(4) for e in range(8)}
    finally:
        packed.close()
    assert cached_experts(SimpleNamespace(), 4, 8) is None


def test_probes_measure_the_fixed_costs():
    prof = MachineProfile.measure(torch.float32)
    assert 0 < prof.linear_call_s < 0.01 and 0 < prof.attn_group_s < 0.1 and 0 < prof.layer_s < 0.1
    assert 0 < prof.seq_s < 0.01 and prof.moe_call_s >= 0 and prof.expert_call_s >= 0
    assert os.cpu_count() >= 1
