"""gpt-oss: moetier against transformers on tiny random-weight checkpoints.

The config exercises sinks, alternating sliding-window (window 4, shorter than the prompts) and full
layers, YaRN rotary, biases everywhere, the router's top-k-then-softmax, and a clamped SwiGLU whose
limit is low enough to clamp. MXFP4: a checkpoint quantized here to the hub's ``*_blocks`` /
``*_scales`` layout, checked against transformers' own dequantizer, loads to exactly the dequantized
weights. The sliding layers' KV stays bounded to the window, latency and throughput caches alike.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moetier import LLM, SamplingParams
from moetier.runtime.batch import ForwardBatch
from moetier.runtime.kv_cache import KVPool, SeqKV
from moetier.weights.loader import load_args, load_model
from tiny import FAMILY_CONFIGS, assert_logits_close, chunked_prefill_logits, llm_greedy, make_checkpoint, \
    moetier_logits, reference_greedy, reference_logits

WINDOW = 4
CONFIG = dict(FAMILY_CONFIGS["gpt_oss"], num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=3,
              rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                               "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64},
              eos_token_id=None, pad_token_id=0)
IDS = [5, 17, 99, 3, 42, 42, 7, 120, 64, 1, 88, 23]
IDS2 = [9, 31, 2, 77, 54, 110, 8]
GREEDY = 16

_BUILT: dict = {}


def _build(layout: str, tmp_path_factory) -> dict:
    if layout not in _BUILT:
        folder = make_checkpoint(tmp_path_factory.mktemp(f"gpt_oss_{layout}"), "gpt_oss", CONFIG,
                                 shard_size="40KB" if layout == "sharded" else None)
        model, args, _ = load_model(folder, dtype="float32")
        _BUILT[layout] = dict(path=folder, model=model, args=args, ref=reference_logits(folder, IDS))
    return _BUILT[layout]


@pytest.fixture(scope="module", params=["hub", "sharded"])
def case(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return _build("hub", tmp_path_factory)


def test_layers_follow_the_config(hub):
    layers = hub["model"].model.layers
    assert [layer.self_attn.ring for layer in layers] == [WINDOW, None, WINDOW, None]
    assert all(layer.self_attn.sinks is not None for layer in layers)
    assert all(layer.fused is None for layer in layers)


def test_prefill_logits_match(case):
    assert_logits_close(moetier_logits(case["model"], IDS), case["ref"])


def test_decode_through_kv_cache_matches(case):
    assert_logits_close(moetier_logits(case["model"], IDS, split=3), case["ref"])


def test_chunked_prefill_matches(hub):
    """Chunks that start mid-window and past it, and one longer than the window."""
    assert_logits_close(chunked_prefill_logits(hub["model"], IDS, [0, 3, 9, 10, 12]), hub["ref"])


def test_greedy_continuation_identical(hub):
    assert llm_greedy(hub["path"], [IDS], GREEDY) == [reference_greedy(hub["path"], IDS, GREEDY)]


def test_batched_greedy_identical(hub):
    """Two prompts of different lengths decoded together."""
    want = [reference_greedy(hub["path"], p, GREEDY) for p in (IDS, IDS2)]
    assert llm_greedy(hub["path"], [IDS, IDS2], GREEDY) == want


def test_bfloat16_close_to_float32(hub):
    """bf16 can flip a near-tied expert (transformers' bf16 flips at other tokens than ours), so check
    each position against the float32 reference, most of them closely."""
    model, _, _ = load_model(hub["path"], dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    from moetier.models.fused import eligible

    assert not any(eligible(layer) for layer in model.model.layers)  # the native fused layer computes none of this
    ours = moetier_logits(model, IDS, split=6)
    scale = hub["ref"].abs().max().item()
    err = (ours - hub["ref"]).abs().amax(dim=1)
    assert err.median() <= 0.02 * scale and err.max() <= 0.1 * scale, err


def test_sliding_layers_hold_at_most_the_window(hub):
    """A 40-token sequence: each sliding layer's cache holds WINDOW positions, the full layers all 40."""
    model = hub["model"]
    n = len(model.model.layers)
    ids = (IDS * 4)[:40]
    kv = SeqKV(n, 8, "cpu", torch.float32)
    for chunk in (ids[:7], *([t] for t in ids[7:])):
        batch = ForwardBatch.build([kv], [len(chunk)], "cpu")
        model(torch.tensor(chunk), batch)
        batch.commit()
    held = [kv.positions_held(i) for i in range(n)]
    assert [h for i, h in enumerate(held) if i % 2 == 0] == [WINDOW, WINDOW]
    assert all(h >= 40 for i, h in enumerate(held) if i % 2 == 1)
    # the throughput runner's pool: sliding layers get window-sized rows, however long the pool's rows are
    pool = KVPool(n, 2, 64, "cpu", torch.float32)
    caches = [pool.take(), pool.take()]
    batch = ForwardBatch.build(caches, [len(IDS), len(IDS2)], "cpu")
    model(torch.tensor(IDS + IDS2), batch)
    assert [pool.layers[i][0].shape[2] for i in range(n)] == [WINDOW, 64, WINDOW, 64]
    # and the memory accounting counts each sliding layer's ring, not a position per token
    from moetier.runtime.cache_spec import kv_bytes_per_token, state_bytes_per_seq

    per_pos = 2 * CONFIG["num_key_value_heads"] * CONFIG["head_dim"] * 4
    assert kv_bytes_per_token(hub["args"], torch.float32) == 2 * per_pos
    assert state_bytes_per_seq(hub["args"], torch.float32) == 2 * WINDOW * per_pos


def test_args_defaults_follow_transformers(tmp_path):
    from transformers import AutoConfig

    cfg = dict(vocab_size=128, hidden_size=64, num_attention_heads=8, num_hidden_layers=5)
    ref = AutoConfig.for_model("gpt_oss", **cfg)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_oss"}))  # no layer_types, no rope
    _, args, _ = load_args(tmp_path)
    assert args.layer_types == ref.layer_types
    assert args.rope.kind == "yarn" and args.rope.theta == 150000.0 and args.rope.params["factor"] == 32.0
    assert (args.num_key_value_heads, args.head_dim, args.sliding_window) == (8, 64, 128)


@pytest.mark.parametrize("bad, words", [
    (dict(layer_types=["sliding_attention", "nope"]), "layer_types"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
])
def test_bad_config_is_a_config_error(tmp_path, bad, words):
    from moetier import ConfigError

    raw = dict(vocab_size=128, hidden_size=64, num_attention_heads=8, num_hidden_layers=2, num_local_experts=8,
               model_type="gpt_oss", **bad)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=words):
        load_args(tmp_path)


# --- MXFP4 ---------------------------------------------------------------------------------------

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` ``[..., rows, cols]`` -> the hub's blocks ``[..., rows, cols/32, 16]`` and scales ``[..., rows, cols/32]``:
    per 32 values a power of two (biased by 127) and e2m1 codes, two a byte, the even value in the low nibble."""
    g = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = g.abs().amax(-1).clamp(min=2.0**-100)
    exp = torch.ceil(torch.log2(amax / 6.0))
    mag = (g.abs() / torch.exp2(exp)[..., None]).clamp(max=6.0)
    code = (mag[..., None] - E2M1).abs().argmin(-1)  # nearest magnitude
    code = code + 8 * ((g < 0) & (code > 0))  # sign bit
    code = code.to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8)


@pytest.fixture(scope="module")
def mxfp4(hub, tmp_path_factory):
    """(MXFP4 folder, the same weights dequantized by transformers, stored unquantized)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    q, deq = root / "mxfp4", root / "dequantized"
    for d in (q, deq):
        shutil.copytree(hub["path"], d)
    sd = load_file(str(hub["path"] / "model.safetensors"))
    qsd, dsd = {}, {}
    for name, t in sd.items():
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            blocks, scales = quantize_mxfp4(t.transpose(1, 2).contiguous())  # rows = outputs, as the hub has them
            qsd[name + "_blocks"], qsd[name + "_scales"] = blocks, scales
            dsd[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).contiguous()
            assert dsd[name].shape == t.shape and (dsd[name] - t).abs().max() <= 0.25 * t.abs().max()
        else:
            qsd[name] = dsd[name] = t
    save_file(qsd, str(q / "model.safetensors"), metadata={"format": "pt"})
    save_file(dsd, str(deq / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                       "model.layers.*.mlp.router",
                                                                                       "model.embed_tokens", "lm_head"]}
    (q / "config.json").write_text(json.dumps(cfg))
    return q, deq


def test_mxfp4_loads_to_the_dequantized_weights(mxfp4):
    q, deq = mxfp4
    a, _, _ = load_model(q, dtype="float32")
    b, _, _ = load_model(deq, dtype="float32")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert_logits_close(moetier_logits(a, IDS), reference_logits(deq, IDS))
    # transformers loads the MXFP4 folder itself too (dequantizing it, without triton)
    assert_logits_close(moetier_logits(a, IDS), reference_logits(q, IDS))
    # bf16 holds every MXFP4 value exactly
    c, _, _ = load_model(q, dtype="bfloat16")
    d, _, _ = load_model(deq, dtype="bfloat16")
    assert all(torch.equal(x, y) for x, y in zip(c.state_dict().values(), d.state_dict().values()))


def test_mxfp4_offloaded_equals_resident(mxfp4, tmp_path):
    q, _ = mxfp4
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    prompts = [{"prompt_token_ids": IDS}, {"prompt_token_ids": IDS2}]

    def run(llm):
        return [(o.outputs[0].token_ids, [lp["logprob"] for lp in o.outputs[0].logprobs])
                for o in llm.generate(prompts, params, use_tqdm=False)]

    want = run(LLM(q, dtype="float32"))
    llm = LLM(q, dtype="float32", expert_slots=CONFIG["num_local_experts"] + 2, offload_dir=tmp_path)
    try:
        assert run(llm) == want
        assert llm.stats()["misses"] > 0
    finally:
        llm.close()


def test_sink_attention_is_what_it_says():
    """attend_ext with sinks against the softmax written out: a sink of -inf is plain attention."""
    from moetier.models.attn_ext import attend_ext

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g) for s in ((4, 3, 8), (2, 5, 8), (2, 5, 8)))
    sinks = torch.randn(4, generator=g)
    out = attend_ext(q, k, v, start=2, first=0, scale=0.3, sinks=sinks).view(3, 4, 8).transpose(0, 1)
    kk, vv = k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)
    s = q @ kk.transpose(1, 2) * 0.3
    s = s.masked_fill(torch.arange(5)[None, None, :] > torch.arange(2, 5)[None, :, None], float("-inf"))
    p = torch.exp(s) / (torch.exp(s).sum(-1, keepdim=True) + torch.exp(sinks)[:, None, None])
    assert torch.allclose(out, p @ vv, atol=1e-6)
    plain = attend_ext(q, k, v, 2, 0, 0.3, sinks=torch.full((4,), float("-inf")))
    assert torch.allclose(plain, attend_ext(q, k, v, 2, 0, 0.3), atol=1e-6)
