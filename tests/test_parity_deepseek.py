"""DeepSeek-V2/V3 (MLA, grouped routing, shared experts, YaRN) against transformers."""

from __future__ import annotations

import json

import pytest
import torch

from moetier import LLM, SamplingParams
from moetier.models.deepseek import MLAttention
from moetier.runtime.batch import ForwardBatch
from moetier.runtime.kv_cache import SeqKV
from moetier.weights.loader import load_model
from tiny import assert_logits_close, make_checkpoint, moetier_logits, reference_greedy, reference_logits

BASE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1,
    max_position_embeddings=256, rms_norm_eps=1e-5,
)
YARN = dict(
    rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
    mscale=1.0, mscale_all_dim=0.8, beta_fast=32, beta_slow=1,
)

# name -> (model_type, config overrides, checkpoint layout)
CASES = {
    "v2-greedy": ("deepseek_v2", dict(q_lora_rank=None, topk_method="greedy"), "hub"),
    "v2-group-yarn": (
        "deepseek_v2",
        dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
             routed_scaling_factor=1.5, attention_bias=True, rope_parameters=YARN),
        "fused",
    ),
    "v3": ("deepseek_v3", dict(q_lora_rank=24, n_group=4, topk_group=2, rope_interleave=True), "sharded"),
    "v3-fused": ("deepseek_v3", dict(q_lora_rank=24, n_group=4, topk_group=2), "fused"),
    # legacy config.json keys (rope_theta + rope_scaling), non-interleaved rope, no renormalisation
    "v3-yarn": (
        "deepseek_v3",
        dict(q_lora_rank=None, n_group=2, topk_group=1, rope_interleave=False, norm_topk_prob=False,
             routed_scaling_factor=1.0, rope_parameters=YARN),
        "legacy-rope",
    ),
}

PROMPT = [3, 17, 99, 42, 7, 120, 64, 5, 88, 31, 2, 77]


def _write(folder, name):
    model_type, over, layout = CASES[name]
    make_checkpoint(
        folder, model_type, {**BASE, **over}, fused=layout == "fused",
        shard_size="100KB" if layout == "sharded" else None,
    )
    if layout == "sharded":
        assert len(list(folder.glob("*.safetensors"))) > 1
    if layout == "legacy-rope":  # rewrite rope_parameters the way hub DeepSeek configs spell it
        cfg = json.loads((folder / "config.json").read_text())
        rp = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rp.pop("rope_theta")
        cfg["rope_scaling"] = {"type": rp.pop("rope_type"), **rp}
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    folder = _write(tmp_path_factory.mktemp(request.param), request.param)
    model, _, _ = load_model(folder, dtype="float32")
    return folder, model, reference_logits(folder, PROMPT)


def _set_path(model, absorb):
    for layer in model.model.layers:
        assert isinstance(layer.self_attn, MLAttention)
        layer.self_attn.absorb = absorb


def test_prefill_logits(case):
    folder, model, ref = case
    assert_logits_close(moetier_logits(model, PROMPT), ref)


@pytest.mark.parametrize("absorb", [None, True, False], ids=["auto", "absorbed", "expanded"])
def test_prefill_then_decode_logits(case, absorb):
    folder, model, ref = case
    _set_path(model, absorb)
    try:
        assert_logits_close(moetier_logits(model, PROMPT, split=6), ref)
    finally:
        _set_path(model, None)


def test_greedy_matches_transformers(case):
    """20 greedy tokens for two prompts decoded together by the engine, each as transformers' own."""
    folder, _, _ = case
    prompts = [PROMPT[:8], PROMPT[3:] + [50, 51]]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    outs = LLM(folder, dtype="float32").generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_greedy(folder, p, 20)


@pytest.mark.parametrize("absorb", [None, True, False], ids=["auto", "absorbed", "expanded"])
def test_two_sequences_in_one_batch(case, absorb):
    """Two sequences of different lengths share each step: a joint prefill, then steps
    mixing a multi-token chunk (at a nonzero, different start) with single tokens."""
    folder, model, _ = case
    chunks = (
        [PROMPT[:7], [11], [12, 13, 14], [15]],  # sequence a, per step
        [PROMPT[2:] + [9, 10], [16, 17, 18], [19], [20]],  # sequence b
    )
    kvs = [SeqKV(len(model.model.layers), 4, "cpu", torch.float32) for _ in chunks]
    rows = ([], [])
    _set_path(model, absorb)
    try:
        for ca, cb in zip(*chunks):
            batch = ForwardBatch.build(kvs, [len(ca), len(cb)], "cpu")
            logits = model(torch.tensor(ca + cb), batch, logits_rows=torch.arange(len(ca) + len(cb)))
            batch.commit()
            rows[0].append(logits[: len(ca)])
            rows[1].append(logits[len(ca) :])
    finally:
        _set_path(model, None)
    for i, seq_chunks in enumerate(chunks):
        alone = moetier_logits(model, sum(seq_chunks, []))  # one prefill of the whole sequence
        assert_logits_close(torch.cat(rows[i]), alone)


def test_latent_cache_is_compressed(case):
    """The cache holds one [1, L, kv_lora_rank + qk_rope_head_dim] buffer per layer."""
    folder, model, _ = case
    kv = SeqKV(len(model.model.layers), 16, "cpu", torch.float32)
    b = ForwardBatch.build([kv], [len(PROMPT)], "cpu")
    model(torch.tensor(PROMPT), b)
    args = model.args
    assert kv.nbytes() == args.num_hidden_layers * 16 * (args.kv_lora_rank + args.qk_rope_head_dim) * 4


def test_bfloat16_keeps_router_in_float32(case):
    folder, model, ref = case
    bf, _, _ = load_model(folder, dtype="bfloat16")
    moe = bf.model.layers[-1].mlp
    assert bf.model.embed_tokens.weight.dtype == torch.bfloat16
    assert moe.gate.weight.dtype == torch.float32
    for name, p in moe.gate.named_parameters():  # not rounded through bfloat16
        assert torch.equal(p, model.get_parameter(f"model.layers.{len(bf.model.layers) - 1}.mlp.gate.{name}"))
    assert torch.isfinite(moetier_logits(bf, PROMPT, split=6)).all()


@pytest.mark.parametrize(
    "model_type,over,message",
    [
        ("deepseek_v2", dict(topk_method="noaux_tc"), "topk_method"),
        ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=3, topk_group=1), "n_group"),
        ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=None), "n_group"),
        ("deepseek_v3", dict(n_group=4, topk_group=5), "topk_group"),
        ("deepseek_v3", dict(num_experts_per_tok=9), "num_experts_per_tok"),
        ("deepseek_v3", dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    ],
)
def test_bad_config_is_a_config_error(model_type, over, message):
    from moetier import ConfigError
    from moetier.models import get_family

    with pytest.raises(ConfigError, match=message):
        get_family(model_type).args.from_dict({"model_type": model_type, **BASE, **over})


def test_hub_style_configs_parse():
    """Keys as DeepSeek's own config.json files spell them (V3 with 128 kv heads, scoring_func...)."""
    from moetier.models.deepseek import ModelArgs, V3ModelArgs

    v3 = V3ModelArgs.from_dict({
        "model_type": "deepseek_v3", **BASE, "num_key_value_heads": 128, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "n_group": 4, "topk_group": 2, "moe_layer_freq": 1,
        "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1},
    })
    assert (v3.num_key_value_heads, v3.head_dim, v3.rope.kind, v3.rope.factor) == (4, 8, "yarn", 40.0)
    v2 = ModelArgs.from_dict({"model_type": "deepseek_v2", **BASE, "moe_layer_freq": 2, "first_k_dense_replace": 0})
    assert [v2.is_moe_layer(i) for i in range(3)] == [True, False, True]


# ---- routers and rotary against transformers' own modules, on many tokens ----


def _hf_config(model_type, **over):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**BASE, **over})


@pytest.mark.parametrize(
    "model_type,over",
    [
        ("deepseek_v2", dict(topk_method="greedy", routed_scaling_factor=1.0)),
        ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3)),
        ("deepseek_v3", dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)),
        ("deepseek_v3", dict(n_group=2, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0)),
        ("deepseek_v3", dict(n_group=1, topk_group=1, num_experts_per_tok=3)),
    ],
)
def test_router_matches_transformers(model_type, over):
    from moetier.models import get_family

    cfg = _hf_config(model_type, **over)
    if model_type == "deepseek_v2":
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter as HFRouter
    else:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as HFRouter
    g = torch.Generator().manual_seed(0)
    hf = HFRouter(cfg)
    ours = get_family(model_type).args.from_dict({"model_type": model_type, **BASE, **over}).router()
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hf.weight.shape, generator=g))
        ours.weight.copy_(hf.weight)
        if hasattr(hf, "e_score_correction_bias"):
            hf.e_score_correction_bias.copy_(0.5 * torch.randn(8, generator=g))
            ours.e_score_correction_bias.copy_(hf.e_score_correction_bias)
    x = torch.randn(512, BASE["hidden_size"], generator=g)
    _, ref_w, ref_ids = hf(x)
    w, ids = ours(x)
    w = w * cfg.routed_scaling_factor  # SparseMoeBlock applies the scaling
    ref_order, order = ref_ids.sort(dim=-1), ids.sort(dim=-1)
    assert torch.equal(order.values, ref_order.values)
    torch.testing.assert_close(w.gather(1, order.indices), ref_w.gather(1, ref_order.indices))


@pytest.mark.parametrize("rope", [None, YARN], ids=["default", "yarn"])
def test_rotary_table_matches_transformers(rope):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    from moetier.models.deepseek import V3ModelArgs

    over = {"rope_parameters": rope} if rope else {}
    hf = DeepseekV3RotaryEmbedding(_hf_config("deepseek_v3", **over))
    pos = torch.arange(200)[None]
    cos, sin = hf(torch.zeros(1, dtype=torch.float32), pos)
    args = V3ModelArgs.from_dict({"model_type": "deepseek_v3", **BASE, **over})
    attn = MLAttention(args, 0)
    ours_cos, ours_sin = attn.rotary._table(200, "cpu")
    torch.testing.assert_close(ours_cos[:200], cos[0])
    torch.testing.assert_close(ours_sin[:200], sin[0])

    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    hf_attn = DeepseekV3Attention(_hf_config("deepseek_v3", **over), 0)
    assert attn.scale == pytest.approx(hf_attn.scaling, rel=1e-12)
