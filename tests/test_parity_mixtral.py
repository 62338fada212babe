"""Mixtral: moetier against transformers on tiny random-weight checkpoints."""

import pytest
import torch

from moetier import LLM, SamplingParams
from moetier.weights.loader import load_model
from tiny import assert_logits_close, make_checkpoint, moetier_logits, reference_greedy, reference_logits

CONFIG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, vocab_size=128,
              max_position_embeddings=256)
IDS = [5, 17, 99, 3, 42, 42, 7, 120, 64, 1, 88, 23]


@pytest.fixture(scope="module", params=["hub", "fused", "sharded"])
def ckpt(request, tmp_path_factory):
    kind = request.param
    folder = tmp_path_factory.mktemp(f"mixtral_{kind}")
    return make_checkpoint(folder, "mixtral", CONFIG, fused=kind == "fused",
                           shard_size="40KB" if kind == "sharded" else None)


def test_layout_is_what_it_claims(ckpt):
    names = list(ckpt.glob("*.safetensors"))
    if ckpt.name.startswith("mixtral_sharded"):
        assert len(names) > 1 and (ckpt / "model.safetensors.index.json").exists()


def test_prefill_logits_match(ckpt):
    model, _, _ = load_model(ckpt, dtype="float32")
    assert_logits_close(moetier_logits(model, IDS), reference_logits(ckpt, IDS))


def test_decode_through_kv_cache_matches(ckpt):
    model, _, _ = load_model(ckpt, dtype="float32")
    assert_logits_close(moetier_logits(model, IDS, split=5), reference_logits(ckpt, IDS))


def test_greedy_continuation_identical(ckpt):
    llm = LLM(ckpt, dtype="float32")
    out = llm.generate([{"prompt_token_ids": IDS}], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert out[0].outputs[0].token_ids == reference_greedy(ckpt, IDS, 20)


def test_bfloat16_load_runs_close_to_float32(ckpt):
    model, _, _ = load_model(ckpt, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    ours = moetier_logits(model, IDS)
    ref = reference_logits(ckpt, IDS)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    # bf16 keeps ~3 significant digits; the logits must still agree coarsely
    assert (ours - ref).abs().max() < 0.1 * ref.abs().max()
