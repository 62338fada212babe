"""Memory and cost accounting of layers that are not full attention, family by family.

gpt-oss's sliding layers hold at most the window, Llama 4's chunked layers at most one chunk, and a
gated DeltaNet layer (Qwen3-Next, Qwen3.5) a fixed state per sequence: the KV reserve (``seq_bytes``,
which the engine, the throughput admission and the planner take), the planner's attention cost and
``moetier bench``'s bytes and FLOPs per step must count each for what it is. Each test fails if a
bounded layer is counted as an unbounded KV layer or a state as a cost per token.
"""

import dataclasses

import pytest
import torch

from moetier.bench.metrics import Step, kv_bytes_read, step_flops
from moetier.bench.shape import ModelShape
from moetier.models import get_family
from moetier.runtime.cache_spec import causal_pairs, keys_read, kv, seq_bytes
from moetier.runtime.planner import Job, ModelCost, PassShape, Planner
from tiny import FAMILY_CONFIGS, fixed_machine_profile

QWEN3_NEXT = dict(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                  linear_value_head_dim=12, linear_conv_kernel_dim=4, moe_intermediate_size=32,
                  shared_expert_intermediate_size=48, num_experts=6, num_experts_per_tok=2,
                  max_position_embeddings=512, intermediate_size=96)
CONFIGS = {"gpt_oss": FAMILY_CONFIGS["gpt_oss"], "llama4_text": FAMILY_CONFIGS["llama4_text"],
           "qwen3_next": QWEN3_NEXT, "qwen3_5_moe_text": QWEN3_NEXT}
F32 = torch.float32


def _args(model_type: str):
    family = get_family(model_type)
    return family, family.args.from_dict({**CONFIGS[model_type], "model_type": model_type})


def _layers(args):
    """(bytes per position of one KV layer, full layers, bounded layers (kind, limit), state layers)."""
    caches = args.layer_caches(F32)
    per = 2 * args.num_key_value_heads * args.head_dim * 4
    return (per, sum(c.kind == "kv" for c in caches), [(c.kind, c.limit) for c in caches if c.limit],
            [c for c in caches if c.kind == "state"])


@pytest.mark.parametrize("model_type, kind, limit", [("gpt_oss", "window", 4), ("llama4_text", "chunk", 4)])
def test_bounded_layers_count_at_most_their_limit(model_type, kind, limit):
    _, args = _args(model_type)
    per, full, bounded, _ = _layers(args)
    assert bounded and all(b == (kind, limit) for b in bounded) and full
    for t in (1, limit, 10 * limit, 1000):
        assert seq_bytes(args, F32, t) == (full * t + len(bounded) * min(t, limit)) * per
    # past the limit a position costs only the full layers
    assert seq_bytes(args, F32, 1001) - seq_bytes(args, F32, 1000) == full * per


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_5_moe_text"])
def test_deltanet_state_is_counted_once_per_sequence(model_type):
    _, args = _args(model_type)
    per, full, _, states = _layers(args)
    c = QWEN3_NEXT
    conv = (2 * c["linear_num_key_heads"] * c["linear_key_head_dim"]
            + c["linear_num_value_heads"] * c["linear_value_head_dim"])
    state = (conv * (c["linear_conv_kernel_dim"] - 1)
             + c["linear_num_value_heads"] * c["linear_key_head_dim"] * c["linear_value_head_dim"]) * 4
    assert states and all(s.bytes_per_seq == state for s in states)
    assert seq_bytes(args, F32, 0) == len(states) * state
    assert seq_bytes(args, F32, 1000) - seq_bytes(args, F32, 999) == full * per


def _cost(model_type: str) -> ModelCost:
    family, args = _args(model_type)
    with torch.device("cpu"):
        model = family.build(args)
    return ModelCost.of(model)


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_planner_reserves_what_the_accounting_does(model_type):
    _, args = _args(model_type)
    cost = _cost(model_type)
    for t in (1, 3, 40, 500):
        assert cost.seq_bytes(t) == seq_bytes(args, F32, t)
    job = Job(prompt_lens=[100, 300], new_tokens=[20, 50], max_len=512, stops_early=False)
    plan = Planner(cost, fixed_machine_profile(), kv_budget=1 << 30).plan(job)
    assert plan.memory["kv_per_seq"] == (seq_bytes(args, F32, 120) + seq_bytes(args, F32, 350)) // 2


def _full_only(cost: ModelCost) -> ModelCost:
    """The same model with its bounded and state layers taken out."""
    caches = tuple(c for c in cost.caches if c.kind == "kv")
    return dataclasses.replace(cost, caches=caches, layers=len(caches))


@pytest.mark.parametrize("model_type", ["gpt_oss", "llama4_text"])
def test_planner_attention_of_bounded_layers_stops_growing(model_type):
    """Decode passes of 8 sequences at 1000 and 2000 cached positions: only the full layers' attention
    grows; the bounded layers' is there, but that of ``limit`` keys a query."""
    cost, prof = _cost(model_type), fixed_machine_profile()
    full = _full_only(cost)

    def att(c, ctx):
        shape = PassShape(tokens=8, rows=8, seqs=8, pairs=8 * ctx, ctx=8 * ctx, decode=8, spans=[(ctx - 1, 1)] * 8)
        return c.pass_time(shape, 0, prof, None)["attention"]

    grown = att(cost, 2000) - att(cost, 1000)
    assert grown == pytest.approx(att(full, 2000) - att(full, 1000), rel=1e-9)
    extra = att(cost, 1000) - att(full, 1000)
    bounded = [c for c in cost.caches if c.limit]
    calls = prof.attn_group_s  # 8 decoding sequences: one call a layer
    keys = keys_read(bounded[0].kind, bounded[0].limit, 999, 1)
    want = len(bounded) * (calls + max(8 * keys * cost.attn_flops_per_pair / prof.attn_flops,
                                       8 * keys * bounded[0].bytes_per_token / prof.copy_bps))
    assert extra == pytest.approx(want, rel=1e-9)
    # without spans (the planner's closed form) still no more than the limit a query
    no_spans = PassShape(tokens=8, rows=8, seqs=8, pairs=8 * 2000, ctx=8 * 2000, decode=8)
    assert no_spans.attended(bounded[0]) == (8 * bounded[0].limit, 8 * bounded[0].limit)
    assert no_spans.attended(kv(1)) == (8 * 2000, 8 * 2000)


def test_planner_counts_deltanet_work_per_token_not_per_key():
    cost, prof = _cost("qwen3_next"), fixed_machine_profile()
    full = _full_only(cost)
    states = [c for c in cost.caches if c.kind == "state"]

    def att(c, ctx, tokens=8):
        shape = PassShape(tokens=tokens, rows=8, seqs=8, pairs=8 * ctx, ctx=8 * ctx, decode=8,
                          spans=[(ctx - 1, 1)] * 8)
        return c.pass_time(shape, 0, prof, None)["attention"]

    assert att(cost, 2000) - att(cost, 1000) == pytest.approx(att(full, 2000) - att(full, 1000), rel=1e-9)
    s = states[0]
    want = len(states) * (prof.attn_group_s + 8 * s.flops_per_token / prof.attn_flops
                          + 2 * 8 * s.bytes_per_seq / prof.copy_bps)
    assert s.flops_per_token > 0
    assert att(cost, 1000) - att(full, 1000) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_bench_bytes_and_flops_per_step(model_type):
    family, args = _args(model_type)
    shape = ModelShape.of_args(family, args, F32)
    per, full, bounded, states = _layers(args)
    h = args.num_attention_heads
    pair = 2 * h * 2 * args.head_dim  # one layer, one query-key pair
    assert shape.kv_bytes_per_token == full * per and shape.attn_flops_per_pair == full * pair
    state = sum(s.bytes_per_seq for s in states)
    for starts, lengths in (([1000, 30], [1, 1]), ([0], [12]), ([2], [9])):
        want = sum((full * (s + n) + sum(keys_read(k, lim, s, n) for k, lim in bounded)) * per + state
                   for s, n in zip(starts, lengths))
        assert kv_bytes_read(shape, starts, lengths) == want
    # a decode step 1000 positions further reads only the full layers' 1000 more positions
    assert kv_bytes_read(shape, [2000], [1]) - kv_bytes_read(shape, [1000], [1]) == 1000 * full * per

    def attn_flops(starts, lengths):
        step = Step(seconds=1.0, starts=starts, lengths=lengths, experts=[0] * shape.moe_layers)
        return step_flops(shape, step) - step_flops(shape, dataclasses.replace(step, starts=[0] * len(starts)))

    d = attn_flops([1000], [1])  # attention of a query at 1000 over a query at 0
    want = full * pair * 1000 + pair * sum(causal_pairs(k, lim, 1000, 1) - causal_pairs(k, lim, 0, 1)
                                           for k, lim in bounded)
    assert d == want
    if states:  # the state update: per token fed, whatever the position
        flops = sum(s.flops_per_token for s in states)
        assert shape.state_flops_per_token == flops > 0
        one = Step(seconds=1.0, starts=[0], lengths=[1], experts=[0] * shape.moe_layers)
        two = dataclasses.replace(one, lengths=[2])
        routed = shape.top_k * shape.expert_params * shape.moe_layers
        per_token = 2 * (shape.dense_params + shape.shared_params + routed)
        assert step_flops(shape, two) - step_flops(shape, one) == per_token + flops + shape.attn_flops_per_pair * 2


def test_pairs_and_keys_by_hand():
    """A window of 4 and chunks of 4, queries at positions 0..9 (one prompt of 10)."""
    assert [keys_read("window", 4, s, 1) for s in range(7)] == [1, 2, 3, 4, 4, 4, 4]
    assert [keys_read("chunk", 4, s, 1) for s in range(7)] == [1, 2, 3, 4, 1, 2, 3]
    assert keys_read("window", 4, 6, 3) == 3 + 3 and keys_read("chunk", 4, 6, 3) == 2 + 3
    assert causal_pairs("window", 4, 0, 10) == 1 + 2 + 3 + 4 * 7
    assert causal_pairs("chunk", 4, 0, 10) == 2 * (1 + 2 + 3 + 4) + 1 + 2
    assert causal_pairs("kv", 0, 0, 10) == 55
    assert causal_pairs("window", 4, 3, 4) == 4 * 4 and causal_pairs("chunk", 4, 3, 4) == 4 + 1 + 2 + 3


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_engine_kv_reserve_counts_each_layer_kind(model_type):
    """``LLM``'s KV reserve (one sequence of up to 2048 tokens, taken off an offloading budget)."""
    from types import SimpleNamespace

    from moetier import LLM

    family, args = _args(model_type)
    with torch.device("cpu"):
        model = family.build(args)
    t = min(args.max_position_embeddings, 2048)
    per, full, bounded, states = _layers(args)
    want = (full * t + sum(min(t, lim) for _, lim in bounded)) * per + sum(s.bytes_per_seq for s in states)
    assert LLM._kv_reserve(SimpleNamespace(args=args, model=model), None) == want
    assert want < len(model.model.layers) * t * per  # not every layer a position per token
