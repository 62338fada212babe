"""Tiny random-weight checkpoints written by transformers, and the reference forward.

Every parity test builds its model here so that families are tested the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from moetier.runtime.batch import ForwardBatch
from moetier.runtime.kv_cache import SeqKV


def make_checkpoint(
    folder: Path, model_type: str, config: dict, *, fused: bool = False, shard_size: str | None = None, seed: int = 0
) -> Path:
    """Write a random-weight ``model_type`` checkpoint with transformers' ``save_pretrained``.

    ``fused=True`` stores experts as 3D ``gate_up_proj``/``down_proj`` (the model's own
    state_dict) instead of the per-expert hub layout; ``shard_size`` (e.g. ``"20KB"``)
    forces several shards with an index.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **config)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    _spread_weights(model)
    folder.mkdir(parents=True, exist_ok=True)
    if fused:
        cfg.save_pretrained(folder)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        kw = {"max_shard_size": shard_size} if shard_size else {}
        model.save_pretrained(folder, **kw)
    return folder


def _spread_weights(model) -> None:
    """transformers' init (std 0.02) routes near-uniformly and gives tiny logits; draw
    weights with std 1/sqrt(fan_in) instead, and perturb norms and biases so that
    every parameter matters to the output."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(noise * p.shape[-1] ** -0.5)
            elif "norm" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
        for name, b in model.named_buffers():
            if "correction_bias" in name:
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def built_case(cache: dict, name: str, model_type: str, config: dict, layout: str, tmp_path_factory,
               ids: list[int]) -> dict:
    """A parity case, built once per (name, layout) into ``cache``: a checkpoint in ``layout`` (``hub``,
    ``fused`` or ``sharded``), moetier's float32 model of it, and transformers' logits for ``ids``."""
    from moetier.weights.loader import load_model

    if (name, layout) not in cache:
        folder = make_checkpoint(tmp_path_factory.mktemp(f"{name}_{layout}"), model_type, config,
                                 fused=layout == "fused", shard_size="40KB" if layout == "sharded" else None)
        model, args, _ = load_model(folder, dtype="float32")
        cache[(name, layout)] = dict(name=name, layout=layout, path=folder, model=model, args=args,
                                     ref=reference_logits(folder, ids))
    return cache[(name, layout)]


def reference_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    """transformers' logits ``[len(ids), vocab]`` for one sequence, float32."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


def reference_greedy(folder: Path, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of ``ids`` (``n`` new tokens, EOS ignored)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )
    return out[0, len(ids):].tolist()


def moetier_logits(model, ids: list[int], split: int | None = None, chunks: list[int] | None = None,
                   capacity: int = 8) -> torch.Tensor:
    """moetier's logits for every position; ``split`` prefills ``ids[:split]`` first, then
    feeds the rest one step at a time through the KV cache. ``chunks``: feed chunks of these
    sizes instead (prompt chunks starting mid-sequence). ``capacity``: the cache's first size."""
    kv = SeqKV(len(model.model.layers), capacity, next(model.parameters()).device, next(model.parameters()).dtype)
    if chunks is not None:
        assert sum(chunks) == len(ids)
        cuts = [sum(chunks[:i]) for i in range(len(chunks) + 1)]
        chunks = [ids[a:b] for a, b in zip(cuts, cuts[1:])]
    else:
        split = len(ids) if split is None else split
        chunks = [ids[:split]] + [[t] for t in ids[split:]]
    rows = []
    for chunk in chunks:
        b = ForwardBatch.build([kv], [len(chunk)], kv.device)
        rows.append(model(torch.tensor(chunk, device=kv.device), b, logits_rows=torch.arange(len(chunk))))
        b.commit()
    return torch.cat(rows).cpu()


def chunked_prefill_logits(model, ids: list[int], cuts: list[int]) -> torch.Tensor:
    """moetier's logits for every position, ``ids`` fed as the chunks between consecutive ``cuts``
    (starting at 0, ending at ``len(ids)``) through one KV cache that starts small."""
    kv = SeqKV(len(model.model.layers), 4, "cpu", torch.float32)
    rows = []
    for a, b in zip(cuts, cuts[1:]):
        batch = ForwardBatch.build([kv], [b - a], "cpu")
        rows.append(model(torch.tensor(ids[a:b]), batch, logits_rows=torch.arange(b - a)))
        batch.commit()
    return torch.cat(rows)


def llm_greedy(folder: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    """moetier's greedy continuations (``n`` tokens, EOS ignored) of ``prompts`` decoded together."""
    from moetier import LLM, SamplingParams

    llm = LLM(folder, dtype="float32")
    out = llm.generate([{"prompt_token_ids": p} for p in prompts],
                       SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in out]


def check_cache_paths(case: dict, ids: list[int]) -> None:
    """A built parity case (:func:`built_case`) against transformers' logits: whole prefill, decode through the
    cache after 6 tokens, and prompt chunks that start mid-sequence (and past a sliding window)."""
    assert_logits_close(moetier_logits(case["model"], ids), case["ref"])
    assert_logits_close(moetier_logits(case["model"], ids, split=6), case["ref"])
    assert_logits_close(moetier_logits(case["model"], ids, chunks=[4, 5, 1, 2], capacity=4), case["ref"])


def check_greedy(case: dict, ids: list[int], tokens: int) -> None:
    """``LLM`` greedy decode of ``ids`` gives transformers' tokens."""
    assert llm_greedy(case["path"], [ids], tokens) == [reference_greedy(case["path"], ids, tokens)]


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    """Max abs difference within ``rel`` x the reference's largest logit."""
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel} x max|logit| {scale:.3g}"


def kernel_rows(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[..., K]`` as moetier's own int kernels see it, and each input's largest rounding error.

    The rows are quantized to int8 per group of 32 inputs, scale ``d = max|x| / 127``, codes ``x * (1 / d)`` in
    float32 rounded half to even;
    int4's groups are the weight's 32-blocks (``k // 32``); int8's are strided (kernels/native/gemv.c):
    within each 512-span, lane group ``l`` is the inputs ``64 t + 4 l + i``. Computed here from that
    statement, not by the code under test. Returns (the dequantized rows, half a step per input)."""
    K = x.shape[-1]
    k = torch.arange(K)
    group = k // 32 if kind == "int4" else (k // 512) * 16 + (k % 64) // 4
    xf = x.float().reshape(-1, K)
    amax = torch.zeros(xf.shape[0], int(group.max()) + 1).scatter_reduce(1, group.expand_as(xf), xf.abs(), "amax")
    d = (amax / 127)[:, group]
    q = torch.where(d > 0, xf * (1 / torch.where(d > 0, d, 1)), 0).round().clamp(-127, 127)
    return (q * d).view(x.shape), (d / 2).view(x.shape)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2))


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def add_char_tokenizer(folder: Path) -> None:
    """A character-level tokenizer (ids 0/1 = <s>/</s>, then printable ASCII) with a chat
    template, written in the hub layout; the model's vocab must hold 97 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, **{chr(c): c - 30 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<s>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


_COMMON = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256)
# One small config per family, each with several MoE layers (offloading and format tests)
FAMILY_CONFIGS = {
    "mixtral": dict(_COMMON, intermediate_size=96, num_hidden_layers=3, num_local_experts=6, num_experts_per_tok=2),
    "qwen2_moe": dict(_COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1]),
    "qwen3_moe": dict(_COMMON, num_hidden_layers=3, head_dim=24, intermediate_size=96, moe_intermediate_size=32,
                      num_experts=6, num_experts_per_tok=2, norm_topk_prob=True),
    "olmoe": dict(_COMMON, num_hidden_layers=3, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                  eos_token_id=None, pad_token_id=0),
    "deepseek_v2": dict(_COMMON, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
                        num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, topk_method="greedy"),
    "deepseek_v3": dict(_COMMON, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
                        num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1),
    # sliding layers 0 and 2 (window 4: offloading and throughput runs outgrow it), clamps that bite
    "gpt_oss": dict(_COMMON, head_dim=16, intermediate_size=32, num_hidden_layers=3, num_local_experts=6,
                    num_experts_per_tok=2, sliding_window=4, swiglu_limit=1.0),
    # layers 1 and 3 MoE, 3 NoPE (full attention, temperature tuned from position 3), 0-2 chunks of 4
    "llama4_text": dict(_COMMON, head_dim=16, intermediate_size=32, intermediate_size_mlp=48, num_hidden_layers=4,
                        num_local_experts=6, num_experts_per_tok=2, interleave_moe_layer_step=2,
                        attention_chunk_size=4, floor_scale=3, attn_scale=0.5),
}

# The families added with issue 15, one config each exercising its distinctive parts
# (tests/test_parity_families.py); kept apart so the heavier suites above stay as they were
MORE_FAMILY_CONFIGS = {
    "glm4_moe": dict(
        _COMMON, num_hidden_layers=3, head_dim=24, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
        routed_scaling_factor=1.5, attention_bias=True, use_qk_norm=True),
    "dots1": dict(
        _COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1, norm_topk_prob=True, attention_bias=True,
        sliding_window=5, max_window_layers=1),
    # sparse layers: (i + 1) % 2 == 0 within 1..2, so only layer 1; layer 3 is past the end index
    "ernie4_5_moe": dict(
        _COMMON, num_hidden_layers=4, intermediate_size=96, moe_intermediate_size=32, moe_num_experts=8, moe_k=2,
        moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=2, moe_layer_interval=2,
        use_bias=True, tie_word_embeddings=False),
    "granitemoe": dict(
        _COMMON, num_hidden_layers=3, intermediate_size=32, num_local_experts=6, num_experts_per_tok=2,
        embedding_multiplier=2.0, attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=3.0),
    "phimoe": dict(
        _COMMON, num_hidden_layers=3, intermediate_size=32, num_local_experts=6, num_experts_per_tok=2,
        sliding_window=5, attention_bias=True, lm_head_bias=True),
    "hunyuan_v1_moe": dict(
        _COMMON, num_hidden_layers=3, head_dim=16, intermediate_size=32, num_experts=6, moe_topk=[2, 3, 2],
        attention_bias=True, rope_scaling={"type": "dynamic", "alpha": 50.0, "factor": 1.0}),
}


def fixed_machine_profile():
    """Fixed machine rates, so plans made in tests do not depend on how busy the machine is."""
    from moetier.runtime.machine import MachineProfile

    return MachineProfile(matmul_flops=50e9, stream_bps=5e9, copy_bps=8e9, attn_flops=10e9, attn_call_s=3e-5,
                          op_s=3e-6, threads=1)
