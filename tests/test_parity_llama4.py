"""Llama 4 (text): moetier against transformers on tiny random-weight checkpoints.

The configs exercise chunked attention (chunks of 4, shorter than the prompts) on RoPE layers, NoPE
layers with temperature tuning (``floor_scale`` 3, so it changes from the third token on), L2 q/k
norm, the sigmoid router weighing the expert input, the shared expert, dense layers between MoE ones
(``interleave_moe_layer_step``) or listed ``moe_layers``, and llama3 rope scaling; and the language
model of a full ``Llama4ForConditionalGeneration`` checkpoint.
"""

import json

import pytest
import torch

from moetier.models.moe import SparseMoeBlock
from moetier.runtime.batch import ForwardBatch
from moetier.runtime.kv_cache import KVPool, SeqKV
from moetier.weights.loader import load_args, load_model
from tiny import FAMILY_CONFIGS, assert_logits_close, chunked_prefill_logits, llm_greedy, make_checkpoint, \
    moetier_logits, reference_greedy, reference_logits

BASE = FAMILY_CONFIGS["llama4_text"]
CONFIGS = {
    "step2": dict(BASE),
    # every layer MoE but layer 2, top-1, no qk norm, NoPE every 2nd layer, llama3 rope scaling
    "listed": dict(BASE, num_hidden_layers=4, moe_layers=[0, 1, 3], num_experts_per_tok=1, use_qk_norm=False,
                   no_rope_layer_interval=2, attention_bias=True,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 16}),
}
IDS = [5, 17, 99, 3, 42, 42, 7, 120, 64, 1, 88, 23]
IDS2 = [9, 31, 2, 77, 54, 110, 8]
GREEDY = 16

_BUILT: dict = {}


def _build(name: str, tmp_path_factory) -> dict:
    if name not in _BUILT:
        folder = make_checkpoint(tmp_path_factory.mktemp(f"llama4_{name}"), "llama4_text", CONFIGS[name])
        model, args, _ = load_model(folder, dtype="float32")
        _BUILT[name] = dict(name=name, path=folder, model=model, args=args, ref=reference_logits(folder, IDS))
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


def test_layers_follow_the_config(case):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(case["path"], dtype=torch.float32)
    layers = case["model"].model.layers
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in layers] == [lay.is_moe_layer for lay in ref.model.layers]
    assert [layer.self_attn.rotary is not None for layer in layers] == [bool(lay.self_attn.use_rope)
                                                                         for lay in ref.model.layers]
    assert [layer.self_attn.chunk for layer in layers] == [4 if t == "chunked_attention" else None
                                                          for t in ref.config.layer_types]
    assert all(layer.fused is None for layer in layers)


def test_prefill_logits_match(case):
    assert_logits_close(moetier_logits(case["model"], IDS), case["ref"])


def test_decode_through_kv_cache_matches(case):
    assert_logits_close(moetier_logits(case["model"], IDS, split=3), case["ref"])


def test_chunked_prefill_matches(case):
    """Prompt chunks that start inside an attention chunk and cross its boundaries."""
    assert_logits_close(chunked_prefill_logits(case["model"], IDS, [0, 3, 9, 10, 12]), case["ref"])


def test_greedy_continuation_identical(case):
    assert llm_greedy(case["path"], [IDS], GREEDY) == [reference_greedy(case["path"], IDS, GREEDY)]


def test_batched_greedy_identical(case):
    """Two prompts of different lengths decoded together."""
    want = [reference_greedy(case["path"], p, GREEDY) for p in (IDS, IDS2)]
    assert llm_greedy(case["path"], [IDS, IDS2], GREEDY) == want


def test_chunked_layers_hold_one_chunk(case):
    """After 23 tokens each chunked layer's cache holds one chunk (4 positions); full ones all 23."""
    model = case["model"]
    n = len(model.model.layers)
    kv = SeqKV(n, 8, "cpu", torch.float32)
    ids = (IDS + IDS2 + IDS)[:23]
    for chunk in (ids[:6], *([t] for t in ids[6:])):
        batch = ForwardBatch.build([kv], [len(chunk)], "cpu")
        model(torch.tensor(chunk), batch)
        batch.commit()
    chunked = [layer.self_attn.chunk is not None for layer in model.model.layers]
    assert any(chunked) and not all(chunked)
    assert [kv.positions_held(i) for i in range(n)] == [4 if c else 32 for c in chunked]
    # a chunk is taken as it fills: 2 tokens into a sequence a chunked layer holds 2 positions
    kv = SeqKV(n, 1, "cpu", torch.float32)
    model(torch.tensor(ids[:2]), ForwardBatch.build([kv], [2], "cpu"))
    assert [kv.positions_held(i) for i in range(n) if chunked[i]] == [2] * sum(chunked)
    # the memory accounting: a chunked layer counts at most one chunk, a full one every position
    from moetier.runtime.cache_spec import kv_bytes_per_token, seq_bytes

    args = case["args"]
    per = 2 * args.num_key_value_heads * args.head_dim * 4
    full = n - sum(chunked)
    assert kv_bytes_per_token(args, torch.float32) == full * per
    assert seq_bytes(args, torch.float32, 23) == (23 * full + 4 * sum(chunked)) * per
    assert seq_bytes(args, torch.float32, 3) == 3 * n * per
    # the throughput runner's pool: a chunked layer's rows hold one chunk (or the row, if shorter)
    for cap in (64, 3):
        pool = KVPool(n, 2, cap, "cpu", torch.float32)
        caches = [pool.take(), pool.take()]
        lens = [min(cap, len(IDS)), min(cap, len(IDS2))]
        model(torch.tensor(IDS[: lens[0]] + IDS2[: lens[1]]), ForwardBatch.build(caches, lens, "cpu"))
        assert [pool.layers[i][0].shape[2] for i in range(n)] == [min(cap, 4) if c else cap for c in chunked]
        assert pool.nbytes() == 2 * seq_bytes(args, torch.float32, cap)


def test_bfloat16_close_to_transformers_bfloat16(case):
    from transformers import AutoModelForCausalLM

    model, _, _ = load_model(case["path"], dtype="bfloat16")
    from moetier.models.fused import eligible

    assert not any(eligible(layer) for layer in model.model.layers)  # the native fused layer computes none of this
    ours = moetier_logits(model, IDS, split=6)
    ref = AutoModelForCausalLM.from_pretrained(case["path"], dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref16 = ref(torch.tensor([IDS])).logits[0].float()
    assert_logits_close(ours, ref16, rel=0.06)


def test_full_checkpoint_loads_its_language_model(tmp_path_factory):
    """A Llama4ForConditionalGeneration folder (vision tower included) gives the text model's weights
    and transformers' logits for text input."""
    from transformers import AutoModelForCausalLM, Llama4Config, Llama4ForConditionalGeneration

    case = _build("step2", tmp_path_factory)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    full = Llama4ForConditionalGeneration(Llama4Config(text_config=dict(CONFIGS["step2"]), vision_config=vision))
    text = AutoModelForCausalLM.from_pretrained(case["path"], dtype=torch.float32)
    full.language_model.load_state_dict(text.state_dict())
    folder = tmp_path_factory.mktemp("llama4_full")
    full.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama4"
    model, args, _ = load_model(folder, dtype="float32")
    assert args.num_hidden_layers == CONFIGS["step2"]["num_hidden_layers"]
    a, b = model.state_dict(), case["model"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():  # its language model: 5.24's full-model forward fails on text-only input
        ref = full.eval().language_model(input_ids=torch.tensor([IDS])).logits[0].float()
    assert_logits_close(moetier_logits(model, IDS, split=5), ref)


def test_args_defaults_follow_transformers(tmp_path):
    from transformers import AutoConfig

    cfg = dict(vocab_size=128, hidden_size=64, num_attention_heads=8, num_hidden_layers=6, interleave_moe_layer_step=2)
    ref = AutoConfig.for_model("llama4_text", **cfg)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama4_text"}))
    _, args, _ = load_args(tmp_path)
    assert (args.no_rope_layers, args.moe_layers, args.layer_types) == (ref.no_rope_layers, ref.moe_layers,
                                                                        ref.layer_types)
    assert args.rope.theta == 500000.0 and args.attention_chunk_size == 8192


@pytest.mark.parametrize("bad, words", [
    (dict(layer_types=["chunked_attention", "sliding"]), "layer_types"),
    (dict(moe_layers=["1"]), "moe_layers"),
    (dict(interleave_moe_layer_step=0), "interleave_moe_layer_step"),
    (dict(num_experts_per_tok=17), "num_experts_per_tok"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4}), "rope type"),
])
def test_bad_config_is_a_config_error(tmp_path, bad, words):
    from moetier import ConfigError

    raw = dict(vocab_size=128, hidden_size=64, num_attention_heads=8, num_hidden_layers=2, model_type="llama4_text",
               **bad)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=words):
        load_args(tmp_path)
