"""gpt-oss: moetier against transformers on tiny random-weight checkpoints.

The config exercises sinks, alternating sliding-window (window 4, shorter than the prompts) and full
layers, YaRN rotary, biases everywhere, the router's top-k-then-softmax, and a clamped SwiGLU whose
limit is low enough to clamp. MXFP4: a checkpoint quantized here to the hub's ``*_blocks`` /
``*_scales`` layout, checked against transformers' own dequantizer, loads to exactly the dequantized
weights, and by default keeps its experts as int8 groups of 32 holding exactly those values (resident,
offloaded and throughput runs alike, matching the dequantized path).
The sliding layers' KV stays bounded to the window, latency and throughput caches alike.
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
    # the throughput runner's pool: sliding layers get rows of at most the window, however long the pool's rows
    from moetier.runtime.cache_spec import kv_bytes_per_token, seq_bytes, state_bytes_per_seq

    per_pos = 2 * CONFIG["num_key_value_heads"] * CONFIG["head_dim"] * 4
    for cap, rows in ((64, [WINDOW, 64, WINDOW, 64]), (3, [3, 3, 3, 3])):
        pool = KVPool(n, 2, cap, "cpu", torch.float32)
        caches = [pool.take(), pool.take()]
        lens = [min(cap, len(IDS)), min(cap, len(IDS2))]
        batch = ForwardBatch.build(caches, lens, "cpu")
        model(torch.tensor(IDS[: lens[0]] + IDS2[: lens[1]]), batch)
        assert [pool.layers[i][0].shape[2] for i in range(n)] == rows
        assert pool.nbytes() == 2 * seq_bytes(hub["args"], torch.float32, cap)  # what the accounting reserves a row
    # the memory accounting counts each sliding layer up to its window, not a position per token for ever
    assert kv_bytes_per_token(hub["args"], torch.float32) == 2 * per_pos  # the two full layers
    assert state_bytes_per_seq(hub["args"], torch.float32) == 0
    assert seq_bytes(hub["args"], torch.float32, 40) == (2 * 40 + 2 * WINDOW) * per_pos
    assert seq_bytes(hub["args"], torch.float32, 3) == 4 * 3 * per_pos  # shorter than the window: its length


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


def _experts(model):
    from moetier.models.moe import Experts

    return [m for m in model.modules() if isinstance(m, Experts)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mxfp4_experts_stay_int8_with_exactly_their_values(mxfp4, dtype):
    """Loaded with no quantization asked, MXFP4 experts are int8 groups of 32 (power-of-two scales in the run
    dtype) whose values are the MXFP4 values, as transformers dequantizes them; biases, gate/up order and the
    other weights as the dequantized checkpoint's."""
    q, deq = mxfp4
    llm = LLM(q, dtype=dtype)
    assert llm.quantization == {"name": "int8-g32", "experts": {"kind": "int8", "group_size": 32}, "dense": None}
    ref, _, _ = load_model(deq, dtype=dtype)  # the dequantized weights, not quantized again
    ours = _experts(llm.model)
    assert len(ours) == CONFIG["num_hidden_layers"]
    for m, r in zip(ours, _experts(ref)):
        assert m.quant_layout is not None
        for e in range(m.num_experts):
            for qw, want in zip(m.packed[e], (r.gate_up_proj[e], r.down_proj[e])):
                assert (qw.kind, qw.group_size, qw.codes.dtype, qw.scales.dtype) == ("int8", 32, torch.int8, want.dtype)
                assert torch.equal(qw.dequantize(want.dtype), want)
                mant, _ = torch.frexp(qw.scales.float())
                assert bool((mant == 0.5).all())  # powers of two
        assert torch.equal(m.gate_up_proj_bias, r.gate_up_proj_bias) and torch.equal(m.down_proj_bias, r.down_proj_bias)
    llm.close()


def test_mxfp4_experts_quantized_as_they_are_read(mxfp4):
    """The resident load quantizes expert by expert (the stacks never held dequantized) into the same
    regions as quantizing the dequantized stacks after loading."""
    from moetier.kernels.quant import MXFP4_INT8

    q, _ = mxfp4
    direct, _, _ = load_model(q, dtype="bfloat16", experts_scheme=MXFP4_INT8)
    after, _, _ = load_model(q, dtype="bfloat16")
    for m, r in zip(_experts(direct), _experts(after)):
        assert m.gate_up_proj.device.type == "meta" and m.down_proj.device.type == "meta"
        r.quantize(MXFP4_INT8)
        assert m.quant_layout == r.quant_layout
        for e in range(m.num_experts):
            assert torch.equal(m.regions[e, : m.quant_layout.nbytes], r.regions[e, : r.quant_layout.nbytes])


@pytest.fixture(scope="module")
def mxfp4_runs(mxfp4):
    """Greedy tokens and logprobs of two prompts on the MXFP4 checkpoint: int8 experts (the default) and
    dequantized (``quantization="none"``), latency and throughput."""
    q, _ = mxfp4
    out = {}
    for quant in (None, "none"):
        llm = LLM(q, dtype="float32", quantization=quant)
        out[quant] = {mode: _run(llm, mode) for mode in ("latency", "throughput")}
        llm.close()
    return out


PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
PROMPTS = [{"prompt_token_ids": IDS}, {"prompt_token_ids": IDS2}]


def _run(llm, mode="latency"):
    return [(o.outputs[0].token_ids, [lp["logprob"] for lp in o.outputs[0].logprobs])
            for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False, mode=mode)]


def test_mxfp4_int8_matches_the_dequantized_path(mxfp4_runs):
    """The same weights through the int8 kernels: greedy tokens identical, logprobs close (the weights are
    exact; moetier's native int kernels round their input rows to int8 per block of 32, as llama.cpp's do,
    which moves a logprob by some 1e-2 at most here)."""
    ours, deq = mxfp4_runs[None], mxfp4_runs["none"]
    for mode in ("latency", "throughput"):
        assert [t for t, _ in ours[mode]] == [t for t, _ in deq[mode]]
        for (_, a), (_, b) in zip(ours[mode], deq[mode]):
            assert max(abs(x - y) for x, y in zip(a, b)) < 3e-2
    assert [t for t, _ in ours["throughput"]] == [t for t, _ in ours["latency"]]


def test_mxfp4_logits_close_to_the_dequantized_model(mxfp4):
    q, deq = mxfp4
    llm = LLM(q, dtype="float32")
    assert_logits_close(moetier_logits(llm.model, IDS, split=6), reference_logits(deq, IDS), rel=1e-2)
    llm.close()


def test_mxfp4_bfloat16_int8_close_to_the_bfloat16_dequantized_path(mxfp4):
    """In bf16 the int8 experts against the same values as bf16 weights, position by position (bf16 may
    flip a near-tied expert, as in test_bfloat16_close_to_float32)."""
    q, _ = mxfp4
    runs = []
    for quant in (None, "none"):
        llm = LLM(q, dtype="bfloat16", quantization=quant)
        runs.append(moetier_logits(llm.model, IDS, split=6).float())
        llm.close()
    ours, deq = runs
    scale = deq.abs().max().item()
    err = (ours - deq).abs().amax(dim=1)
    assert err.median() <= 0.02 * scale and err.max() <= 0.1 * scale, err


@pytest.mark.parametrize("mode", ["latency", "throughput"])
def test_mxfp4_offloaded_equals_resident(mxfp4, mxfp4_runs, tmp_path, mode):
    """Offloaded: the first-use packed copy holds the int8 regions, bit for bit the resident run's outputs."""
    q, _ = mxfp4
    llm = LLM(q, dtype="float32", expert_slots=CONFIG["num_local_experts"] + 2, offload_dir=tmp_path)
    try:
        assert llm.quantization["experts"] == {"kind": "int8", "group_size": 32}
        assert _run(llm, mode) == mxfp4_runs[None][mode]
        assert llm.stats()["misses"] > 0
        # the KV reserve taken off the budget: sliding layers up to the window, full ones every position
        from moetier.runtime.cache_spec import seq_bytes

        per_pos, t = 2 * CONFIG["num_key_value_heads"] * CONFIG["head_dim"] * 4, CONFIG["max_position_embeddings"]
        assert llm.memory["kv_reserve"] == seq_bytes(llm.args, torch.float32, t) == (2 * t + 2 * WINDOW) * per_pos
        copies = [p for p in tmp_path.iterdir() if p.is_dir() and p.name.endswith("-int8g32x")]
        assert len(copies) == 1
    finally:
        llm.close()


def test_mxfp4_asked_another_quantization_follows_it(mxfp4):
    q, _ = mxfp4
    llm = LLM(q, dtype="float32", quantization="int4")
    assert llm.quantization["experts"] == {"kind": "int4", "group_size": 32}
    llm.close()
    llm = LLM(q, dtype="float32", quantization="none")
    assert llm.quantization is None
    llm.close()


def test_mxfp4_out_of_range_exponents_stay_dequantized(mxfp4, tmp_path, caplog):
    """An exponent whose values overflow the run dtype (here 2^(250 - 127) x 6 in float16): no exact int8 for
    it, so the experts stay dequantized, said in a warning, resident and offloaded alike."""
    q, _ = mxfp4
    bad = tmp_path / "bad"
    shutil.copytree(q, bad)
    sd = load_file(str(bad / "model.safetensors"))
    name = next(n for n in sd if n.endswith("down_proj_scales"))
    sd[name][0, 0, 0] = 250
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        llm = LLM(bad, dtype="float16")
    assert llm.quantization is None and "MXFP4 experts kept dequantized" in caplog.text
    llm.close()
    caplog.clear()
    with caplog.at_level("WARNING"):
        llm = LLM(bad, dtype="float16", expert_slots=CONFIG["num_local_experts"] + 2, offload_dir=tmp_path / "off")
    try:
        assert llm.quantization is None and "MXFP4 experts kept dequantized" in caplog.text
    finally:
        llm.close()


def test_mxfp4_convert_keeps_int8_unless_told(mxfp4, tmp_path):
    from moetier.weights.packed import PackedCheckpoint
    from moetier.weights.packed_write import convert

    q, _ = mxfp4
    for quant, want in ((None, {"experts": {"kind": "int8", "group_size": 32}, "dense": None}), ("none", None)):
        out = convert(q, tmp_path / str(quant), progress=False, quant=quant)
        with PackedCheckpoint(out) as ckpt:
            assert ckpt.quant == want


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
