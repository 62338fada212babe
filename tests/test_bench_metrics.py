"""The benchmark's formulas against numbers worked out by hand from tiny configs."""

import pytest
import torch

from moetier.bench.hardware import Hardware
from moetier.bench.metrics import (Step, attention_pairs, kwh_per_million, percentiles, step_bytes, step_flops,
                                   usd_per_million, utilization)
from moetier.bench.shape import ModelShape
from moetier.bench.summary import phase
from moetier.models import get_family
from tiny import FAMILY_CONFIGS

MIX = FAMILY_CONFIGS["mixtral"]
H, V, L = MIX["hidden_size"], MIX["vocab_size"], MIX["num_hidden_layers"]  # 64, 128, 3
HQ, HKV, D = MIX["num_attention_heads"], MIX["num_key_value_heads"], H // MIX["num_attention_heads"]  # 4, 2, 16
I, E, K = MIX["intermediate_size"], MIX["num_local_experts"], MIX["num_experts_per_tok"]  # 96, 6, 2

# by hand: q and o are H x HQ*D, k and v are H x HKV*D, the router E x H, in every layer
DENSE = L * (2 * H * HQ * D + 2 * H * HKV * D + E * H)
EXPERT = 3 * H * I  # gate, up, down
HEAD = V * H
NORMS = 2 * H * L + H  # two per layer, one final
KV_PER_TOKEN_FP32 = 2 * HKV * D * L * 4  # keys and values, every layer, 4 bytes each
ATTN_PER_PAIR = 2 * HQ * (D + D) * L  # q.k and p.v, a multiply-add each, per head, per layer


def shape_of(model_type: str, dtype=torch.float32, **extra) -> ModelShape:
    family = get_family(model_type)
    args = family.args.from_dict({"model_type": model_type, **FAMILY_CONFIGS[model_type], **extra})
    return ModelShape.of_args(family, args, dtype)


def test_mixtral_shape_by_hand():
    s = shape_of("mixtral")
    assert (s.dense_params, s.shared_params, s.head_params, s.other_params) == (DENSE, 0, HEAD, NORMS)
    assert (s.expert_params, s.moe_layers, s.num_experts, s.top_k) == (EXPERT, L, E, K)
    assert s.kv_bytes_per_token == KV_PER_TOKEN_FP32
    assert s.attn_flops_per_pair == ATTN_PER_PAIR
    assert s.resident_bytes == (DENSE + HEAD + NORMS) * 4 and s.expert_bytes == EXPERT * 4


def test_tied_embeddings_are_read_once_as_the_head():
    s = shape_of("mixtral", tie_word_embeddings=True)
    assert s.head_params == HEAD and s.dense_params == DENSE and s.other_params == NORMS


def test_bf16_halves_weight_and_kv_bytes():
    s = shape_of("mixtral", torch.bfloat16)
    assert s.weight_bytes == 2 and s.kv_bytes_per_token == KV_PER_TOKEN_FP32 // 2


def test_deepseek_shared_experts_and_latent_kv():
    c = FAMILY_CONFIGS["deepseek_v2"]
    s = shape_of("deepseek_v2")
    moe_layers = c["num_hidden_layers"] - c["first_k_dense_replace"]  # 2
    assert s.moe_layers == moe_layers
    assert s.expert_params == 3 * c["hidden_size"] * c["moe_intermediate_size"]
    assert s.shared_params == moe_layers * 3 * c["hidden_size"] * c["moe_intermediate_size"] * c["n_shared_experts"]
    # MLA caches one latent of kv_lora_rank plus one rotary key per token per layer, not heads x (k + v)
    assert s.kv_bytes_per_token == (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * c["num_hidden_layers"] * 4
    d_qk, d_v = c["qk_nope_head_dim"] + c["qk_rope_head_dim"], c["v_head_dim"]
    assert s.attn_flops_per_pair == 2 * c["num_attention_heads"] * (d_qk + d_v) * c["num_hidden_layers"]


def test_qwen2_shared_expert_with_its_gate_and_a_dense_layer():
    c = FAMILY_CONFIGS["qwen2_moe"]
    s = shape_of("qwen2_moe")
    hd = H // HQ
    assert s.moe_layers == 2  # layer 1 is in mlp_only_layers
    assert s.shared_params == 2 * (3 * H * c["shared_expert_intermediate_size"] + H)  # MLP + its [1, H] gate
    attn = 2 * H * HQ * hd + 2 * H * HKV * hd
    assert s.dense_params == 3 * attn + 2 * c["num_experts"] * H + 3 * H * c["intermediate_size"]
    assert s.other_params == NORMS + 3 * (HQ * hd + 2 * HKV * hd)  # norms and q/k/v biases


def test_decode_step_bytes_and_flops_by_hand():
    s = shape_of("mixtral")
    step = Step(seconds=0.01, starts=[5, 9], lengths=[1, 1], experts=[3, 4, 2])
    # weights every step reads; 3 + 4 + 2 distinct experts; each cache read whole, the new token included
    assert step_bytes(s, step) == (DENSE + HEAD + NORMS) * 4 + (3 + 4 + 2) * EXPERT * 4 + (6 + 10) * KV_PER_TOKEN_FP32
    # each of the 2 tokens: dense weights and top-2 experts in each of the 3 layers (not one expert);
    # the LM head for 2 rows; attention over 6 and 10 keys, each sequence counted once
    assert step_flops(s, step) == 2 * (DENSE + K * EXPERT * L) * 2 + 2 * HEAD * 2 + ATTN_PER_PAIR * (6 + 10)
    assert not step.prefill


def test_prefill_attention_pairs_are_causal():
    assert attention_pairs([0, 0], [4, 3]) == (1 + 2 + 3 + 4) + (1 + 2 + 3)
    assert attention_pairs([4], [3]) == 5 + 6 + 7  # a second chunk sees the first
    s = shape_of("mixtral")
    step = Step(0.02, [0, 0], [4, 3], [6, 5, 6])
    assert step.prefill
    assert step_flops(s, step) == 2 * (DENSE + K * EXPERT * L) * 7 + 2 * HEAD * 2 + ATTN_PER_PAIR * 16
    assert step_bytes(s, step) == (DENSE + HEAD + NORMS) * 4 + 17 * EXPERT * 4 + 7 * KV_PER_TOKEN_FP32


def test_utilization_and_cost():
    assert utilization(6e9, 2.0, 3e9) == pytest.approx(1.0)
    # $3.60/h for 1000 s is $1.00, for 2000 tokens: $500 per million
    assert usd_per_million(3.6, 1000, 2000) == pytest.approx(500.0)
    # 700 W for 1000 s is 0.7 MJ = 0.19444 kWh, for 2000 tokens: 97.22 kWh per million
    assert kwh_per_million(700, 1000, 2000) == pytest.approx(700 * 1000 / 3.6e6 * 500)
    assert percentiles([1.0, 2.0, 3.0, 4.0]) == pytest.approx({"mean": 2.5, "p50": 2.5, "p90": 3.7, "p99": 3.97})


def test_phase_is_time_weighted():
    s = shape_of("mixtral")
    hw = Hardware("test", bandwidth=1e9, flops=1e12, usd_per_hour=1.0, watts=100.0, source="datasheet")
    steps = [Step(0.01, [5], [1], [2, 2, 2]), Step(0.03, [6], [1], [2, 1, 3])]
    p = phase(steps, s, hw)
    b = [(DENSE + HEAD + NORMS) * 4 + 6 * EXPERT * 4 + n * KV_PER_TOKEN_FP32 for n in (6, 7)]
    assert p["s_mbu"] == pytest.approx(sum(b) / 0.04 / 1e9)
    assert p["bytes_per_step"] == pytest.approx(sum(b) / 2)
    assert p["throughput_tok_s"] == pytest.approx(2 / 0.04)
    assert p["activated_experts_per_step"] == pytest.approx(2.0)
    assert p["activated_experts_per_layer"] == [2.0, 1.5, 2.5]
    assert phase([], s, hw) is None
