"""Qwen3-Next and Qwen3.5-MoE (gated DeltaNet + gated attention) against transformers on tiny models.

The configs mix three linear-attention layers with one full-attention layer, with more value
heads than key heads in the DeltaNet, a dense layer (Qwen3-Next ``mlp_only_layers``), the gated
shared expert and partial rotary. The prompt is longer than the chunk of the chunked delta
rule (64), so prefill crosses chunks with a carried state. transformers without
flash-linear-attention runs its torch forms, the reference here.
"""

import pytest
import torch

from moetier import LLM, SamplingParams
from moetier.models import fused
from moetier.models.deltanet import GatedDeltaNet, chunk_rule, l2norm, recurrent_step
from moetier.models.moe import SparseMoeBlock
from moetier.runtime.batch import ForwardBatch
from moetier.runtime.cache_spec import kv_bytes_per_token, seq_bytes, state_bytes_per_seq
from moetier.runtime.kv_cache import KVPool, SeqKV
from moetier.weights.loader import load_model
from tiny import add_char_tokenizer, assert_logits_close, make_checkpoint, moetier_logits, reference_logits

BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
            linear_value_head_dim=12, linear_conv_kernel_dim=4, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, num_experts=6, num_experts_per_tok=2, max_position_embeddings=512)
CONFIGS = {
    "next": ("qwen3_next", dict(BASE, intermediate_size=96, mlp_only_layers=[1], norm_topk_prob=True)),
    "next_unnormed": ("qwen3_next", dict(BASE, intermediate_size=96, norm_topk_prob=False,
                                         layer_types=["full_attention", "linear_attention", "linear_attention",
                                                      "full_attention"])),
    "qwen3_5": ("qwen3_5_moe_text", dict(BASE)),
}
CASES = [("next", "hub"), ("next", "fused"), ("next_unnormed", "hub"), ("qwen3_5", "hub"), ("qwen3_5", "fused")]
IDS = torch.randint(0, 128, (90,), generator=torch.Generator().manual_seed(0)).tolist()
IDS2 = [9, 31, 2, 77, 54, 110, 8]
GREEDY = 12
_BUILT: dict = {}


def _greedy(folder, ids, n):
    """transformers' greedy tokens, recomputed without a cache each step: on these tiny hybrid models
    transformers 5.24's generate() (its hybrid cache) can disagree with its own forward at the very first
    token, while the cache-free forward is the model's math."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(ref(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def _build(name, layout, tmp_path_factory):
    if (name, layout) not in _BUILT:
        model_type, config = CONFIGS[name]
        folder = make_checkpoint(tmp_path_factory.mktemp(f"{name}_{layout}"), model_type, config,
                                 fused=layout == "fused")
        model, args, _ = load_model(folder, dtype="float32")
        _BUILT[name, layout] = dict(name=name, path=folder, model=model, args=args, ref=reference_logits(folder, IDS))
    return _BUILT[name, layout]


@pytest.fixture(scope="module", params=CASES, ids=[f"{c}-{layout}" for c, layout in CASES])
def case(request, tmp_path_factory):
    return _build(*request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=list(CONFIGS))
def hub_case(request, tmp_path_factory):
    return _build(request.param, "hub", tmp_path_factory)


def test_layers_follow_config(case):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(case["path"], dtype=torch.float32)
    kinds = [layer.layer_type if hasattr(layer, "layer_type") else layer.block_type for layer in ref.model.layers]
    ours = ["linear_attention" if hasattr(layer, "linear_attn") else "full_attention"
            for layer in case["model"].model.layers]
    assert ours == kinds and "linear_attention" in ours and "full_attention" in ours
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in case["model"].model.layers] == \
        [hasattr(layer.mlp, "experts") for layer in ref.model.layers]


def test_prefill_logits_match(case):
    assert_logits_close(moetier_logits(case["model"], IDS), case["ref"])


def test_decode_through_state_matches(case):
    """Prefill 70 tokens (two chunks), then the recurrent step one token at a time."""
    assert_logits_close(moetier_logits(case["model"], IDS, split=70), case["ref"])


def test_chunked_prefill_matches(case):
    """Prompt chunks that start mid-sequence continue the conv window and the recurrent state."""
    model = case["model"]
    kv = SeqKV(len(model.model.layers), 4, "cpu", torch.float32)
    rows = []
    for a, b in ((0, 3), (3, 50), (50, 51), (51, 90)):
        batch = ForwardBatch.build([kv], [b - a], "cpu")
        rows.append(model(torch.tensor(IDS[a:b]), batch, logits_rows=torch.arange(b - a)))
        batch.commit()
    assert_logits_close(torch.cat(rows), case["ref"])


def test_greedy_continuation_identical(case):
    llm = LLM(case["path"], dtype="float32")
    out = llm.generate([{"prompt_token_ids": IDS}], SamplingParams(max_tokens=GREEDY, temperature=0, ignore_eos=True),
                       use_tqdm=False)
    assert out[0].outputs[0].token_ids == _greedy(case["path"], IDS, GREEDY)


def test_batched_equals_one_at_a_time(hub_case):
    """Two sequences decoding together (the batched conv + recurrent step) against each alone."""
    llm = LLM(hub_case["path"], dtype="float32")
    params = SamplingParams(max_tokens=GREEDY, temperature=0, ignore_eos=True)
    both = llm.generate([{"prompt_token_ids": IDS}, {"prompt_token_ids": IDS2}], params, use_tqdm=False)
    assert both[0].outputs[0].token_ids == _greedy(hub_case["path"], IDS, GREEDY)
    assert both[1].outputs[0].token_ids == _greedy(hub_case["path"], IDS2, GREEDY)


def test_bfloat16_errs_like_transformers_bfloat16(hub_case):
    """bf16 on these tiny models is far from float32 in transformers too (the DeltaNet state
    compounds rounding), so: moetier's bf16 logits are about as far from the float32 ones as
    transformers' bf16 logits are, and closer to those than to the float32 ones."""
    from transformers import AutoModelForCausalLM

    model, _, _ = load_model(hub_case["path"], dtype="bfloat16")
    ours = moetier_logits(model, IDS, split=70)
    ref = AutoModelForCausalLM.from_pretrained(hub_case["path"], dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref16 = ref(torch.tensor([IDS])).logits[0].float()
    assert torch.isfinite(ours).all()
    ref32 = hub_case["ref"]
    ours_err, ref_err = (ours - ref32).abs().mean().item(), (ref16 - ref32).abs().mean().item()
    assert ours_err <= 1.5 * ref_err
    assert (ours - ref16).abs().mean().item() <= ref_err


def test_fused_decode_path_not_installed(hub_case):
    """models/fused.py computes plain GQA layers; these layers are not that."""
    assert not any(fused.eligible(layer) for layer in hub_case["model"].model.layers)
    fused.install(hub_case["model"])
    assert all(layer.fused is None for layer in hub_case["model"].model.layers)


# --- the delta rule itself against transformers' torch forms -------------------------------------------


def _rule_inputs(n, h=3, dk=8, dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, n, h, dk, generator=g), torch.randn(1, n, h, dk, generator=g)
    v = torch.randn(1, n, h, dv, generator=g)
    decay = -torch.rand(1, n, h, generator=g) * 2
    beta = torch.rand(1, n, h, generator=g)
    S0 = torch.randn(1, h, dk, dv, generator=g)
    return q, k, v, decay, beta, S0


@pytest.mark.parametrize("n", [1, 5, 64, 150])
def test_chunk_rule_matches_transformers(n):
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    q, k, v, decay, beta, S0 = _rule_inputs(n)
    for init in (None, S0):
        want, want_S = torch_chunk_gated_delta_rule(q, k, v, decay, beta, initial_state=init, output_final_state=True,
                                                    use_qk_l2norm_in_kernel=True)
        qn, kn = l2norm(q[0]).transpose(0, 1) * 8**-0.5, l2norm(k[0]).transpose(0, 1)
        got, S = chunk_rule(qn, kn, v[0].transpose(0, 1), decay[0].t(), beta[0].t(), None if init is None else init[0])
        torch.testing.assert_close(got.transpose(0, 1), want[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(S, want_S[0], rtol=1e-4, atol=1e-4)


def test_recurrent_step_matches_transformers():
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

    q, k, v, decay, beta, S0 = _rule_inputs(1)
    want, want_S = torch_recurrent_gated_delta_rule(q, k, v, decay, beta, initial_state=S0, output_final_state=True,
                                                    use_qk_l2norm_in_kernel=True)
    got, S = recurrent_step(l2norm(q[:, 0]) / 8**0.5, l2norm(k[:, 0]), v[:, 0], decay[:, 0], beta[:, 0], S0)
    torch.testing.assert_close(got, want[:, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(S, want_S, rtol=1e-6, atol=1e-6)


# --- per-layer caches -------------------------------------------------------------------------------------


def _feed(model, kv, ids):
    batch = ForwardBatch.build([kv], [len(ids)], "cpu")
    model(torch.tensor(ids), batch)
    batch.commit()


def test_state_size_per_sequence_is_constant(hub_case):
    """A linear-attention layer holds the same bytes after 5 tokens as after 300; no KV for it."""
    model, args = hub_case["model"], hub_case["args"]
    linear = [i for i, layer in enumerate(model.model.layers) if hasattr(layer, "linear_attn")]
    sizes = []
    for n in (5, 300):
        kv = SeqKV(len(model.model.layers), 4, "cpu", torch.float32)
        ids = (IDS * 4)[:n]
        _feed(model, kv, ids[:-1])
        _feed(model, kv, ids[-1:])  # and a decode step
        assert all(kv._layers[i] is None for i in linear)
        sizes.append([sum(t.numel() * t.element_size() for t in kv._states[i]) for i in linear])
        assert set(kv._states) == set(linear)
    assert sizes[0] == sizes[1]
    assert sum(sizes[0]) == state_bytes_per_seq(args, torch.float32) > 0
    full = len(model.model.layers) - len(linear)
    assert kv_bytes_per_token(args, torch.float32) == full * 2 * args.num_key_value_heads * args.head_dim * 4


def test_pool_holds_state_rows(hub_case):
    """Pool rows: two sequences decode together on the pool's state rows, as each alone on its own."""
    model = hub_case["model"]
    L = len(model.model.layers)
    pool = KVPool(L, 3, 128, "cpu", torch.float32)
    a, b = pool.take(), pool.take()
    _feed(model, a, IDS[:30])
    _feed(model, b, IDS2)
    batch = ForwardBatch.build([a, b], [1, 1], "cpu")
    together = model(torch.tensor([5, 6]), batch)
    alone = []
    for ids, tok in ((IDS[:30], 5), (IDS2, 6)):
        kv = SeqKV(L, 4, "cpu", torch.float32)
        _feed(model, kv, ids)
        alone.append(model(torch.tensor([tok]), ForwardBatch.build([kv], [1], "cpu")))
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-4)
    linear = [i for i, layer in enumerate(model.model.layers) if hasattr(layer, "linear_attn")]
    assert all(pool.states[i] is not None and pool.layers[i] is None for i in linear)
    args = hub_case["args"]  # what the accounting reserves per row is what the pool holds
    row = 128 * kv_bytes_per_token(args, torch.float32) + state_bytes_per_seq(args, torch.float32)
    assert pool.nbytes() == 3 * row == 3 * seq_bytes(args, torch.float32, 128)
    a.release()
    c = pool.take()  # a's row again: a new prompt ignores what it held
    _feed(model, c, IDS2)
    torch.testing.assert_close(model(torch.tensor([6]), ForwardBatch.build([c], [1], "cpu")), alone[1],
                               rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    model_type, cfg = CONFIGS["next"]
    folder = make_checkpoint(tmp_path_factory.mktemp("next_chat"), model_type,
                             dict(cfg, vocab_size=97, eos_token_id=1, bos_token_id=0, pad_token_id=0))
    add_char_tokenizer(folder)
    return folder


TEXTS = ["hello", "a", "the quick brown fox jumps over the lazy dog" * 2, "0123456789" * 4, "MoE!", "zz top"]


def test_throughput_equals_latency(chat_model):
    """Throughput mode: prompts cut into chunks, state rows in the pool, many sequences per pass."""
    from tiny import fixed_machine_profile

    llm = LLM(chat_model, dtype="float32")
    llm.machine_profile = fixed_machine_profile()
    params = [SamplingParams(max_tokens=8 + i, temperature=0) if i % 2 else
              SamplingParams(max_tokens=9, temperature=0.9, top_p=0.8, seed=i) for i in range(len(TEXTS))]
    lat = llm.generate(TEXTS, params, mode="latency", use_tqdm=False)
    plan = llm.plan(TEXTS, params)
    plan.prefill_tokens = 16  # force prompts across several passes
    thr = llm.generate(TEXTS, params, use_tqdm=False, plan=plan)
    assert [o.outputs[0].token_ids for o in thr] == [o.outputs[0].token_ids for o in lat]
    assert llm.last_run["kv_pool_bytes"] > 0 and llm.last_run["peak_seqs"] > 1


def test_offloaded_output_is_bit_identical(chat_model, tmp_path):
    prompts = [[5, 17, 90, 3, 42, 42, 7, 80], [64, 1, 88], list(range(30, 50))]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)

    def run(llm):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [(o.outputs[0].token_ids, [lp["logprob"] for lp in o.outputs[0].logprobs]) for o in outs]

    want = run(LLM(chat_model, dtype="float32"))
    llm = LLM(chat_model, dtype="float32", expert_slots=CONFIGS["next"][1]["num_experts"], offload_dir=tmp_path)
    try:
        assert run(llm) == want
        assert llm.stats()["misses"] > 0
        assert llm.memory["kv_reserve"] >= state_bytes_per_seq(llm.args, torch.float32) > 0
    finally:
        llm.close()


def test_vision_language_checkpoint_text_weights(tmp_path):
    """A Qwen3_5MoeForConditionalGeneration checkpoint: its text model, the vision tower ignored."""
    from transformers import AutoConfig, Qwen3_5MoeForConditionalGeneration

    from tiny import _spread_weights

    text = dict(CONFIGS["qwen3_5"][1])
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4,
                  temporal_patch_size=1, spatial_merge_size=1, num_position_embeddings=16)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen3_5_moe", text_config=text, vision_config=vision)
    ref = Qwen3_5MoeForConditionalGeneration(cfg).float().eval()
    _spread_weights(ref)
    ref.save_pretrained(tmp_path)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([IDS])).logits[0].float()
    model, args, _ = load_model(tmp_path, dtype="float32")
    assert args.model_type == "qwen3_5_moe" and args.num_hidden_layers == 4
    assert_logits_close(moetier_logits(model, IDS, split=70), want)


def test_bad_layer_types_is_a_config_error(tmp_path):
    import json

    from moetier import ConfigError
    from moetier.weights.loader import load_args

    (tmp_path / "config.json").write_text(json.dumps(dict(BASE, model_type="qwen3_next",
                                                          layer_types=["linear_attention", "sliding_attention"] * 2)))
    with pytest.raises(ConfigError, match="layer_types"):
        load_args(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(BASE, model_type="qwen3_next", linear_num_value_heads=3)))
    with pytest.raises(ConfigError, match="linear_num_value_heads"):
        load_args(tmp_path)


def test_deltanet_module_is_the_one_loaded(hub_case):
    assert any(isinstance(getattr(layer, "linear_attn", None), GatedDeltaNet) for layer in hub_case["model"].model.layers)


def test_packed_round_trip_is_bit_identical(tmp_path, tmp_path_factory):
    """``moetier convert``: the packed folder gives the very same logits (the conv and DeltaNet weights too)."""
    from moetier.weights.packed_write import convert

    hub_case = _build("qwen3_5", "hub", tmp_path_factory)
    packed = convert(hub_case["path"], tmp_path / "packed", progress=False)
    model, _, _ = load_model(packed, dtype="float32")
    want = moetier_logits(hub_case["model"], IDS[:20], split=12)
    assert torch.equal(moetier_logits(model, IDS[:20], split=12), want)


def test_server_serves_the_hybrid_model(chat_model):
    """``moetier serve``: several requests at once (the worker batches them) give LLM's greedy text."""
    import concurrent.futures

    import openai
    from live_server import KEY, LiveServer

    prompts = ["hello there", "abc", "the quick brown fox"]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    want = [o.outputs[0].text for o in LLM(chat_model, dtype="float32").generate(prompts, params, use_tqdm=False)]
    srv = LiveServer("--model", f"next={chat_model}", "--dtype", "float32")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key=KEY, max_retries=0)

        def ask(p):
            return client.completions.create(model="next", prompt=p, max_tokens=10, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            assert list(pool.map(ask, prompts)) == want
    finally:
        srv.stop()
