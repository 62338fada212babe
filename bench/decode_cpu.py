"""Decode tokens/s on the CPU, moetier vs transformers, on one synthetic MoE model held in memory.

Prints one JSON object per batch size with both rates, their ratio, and the
bandwidth limit (active bytes per step / measured copy bandwidth).

    python bench/decode_cpu.py                      # the issue's medium Mixtral (~2.8 GiB bf16)
    python bench/decode_cpu.py --layers 4 --new-tokens 4 --repeats 1   # a fast smoke run
    python bench/decode_cpu.py --family glm4_moe    # the same sizes in another family's layout
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, emit, synthetic_checkpoint  # noqa: E402


def active_bytes_per_step(cfg: dict, batch: int, elem: int) -> int:
    """Bytes a decode step must read: dense weights, the experts the batch activates, the LM head."""
    H, I, E, k, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"], \
        cfg["num_experts_per_tok"], cfg["num_hidden_layers"]
    hd = H // cfg["num_attention_heads"]
    attn = H * hd * (cfg["num_attention_heads"] * 2 + cfg["num_key_value_heads"] * 2)
    expert = 3 * H * I
    distinct = E * (1 - (1 - k / E) ** batch)  # expected experts hit by `batch` tokens routed uniformly
    per_layer = attn + 2 * H + E * H + distinct * expert
    return int((L * per_layer + H + cfg["vocab_size"] * H + batch * H) * elem)


def family_config(family: str, hidden: int, inter: int, layers: int, experts: int, top_k: int) -> dict:
    """A transformers config for ``family`` with these sizes (``inter``: one routed expert's, and the
    shared expert's and dense layers' where the family has them), in the family's own key names."""
    cfg = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
               head_dim=hidden // 16, vocab_size=32000, max_position_embeddings=4096)
    deepseek_like = dict(intermediate_size=inter, moe_intermediate_size=inter, n_routed_experts=experts,
                         num_experts_per_tok=top_k, n_shared_experts=1, first_k_dense_replace=1)
    per_family = {
        "mixtral": dict(intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=top_k),
        "glm4_moe": dict(deepseek_like, norm_topk_prob=True),
        "dots1": dict(deepseek_like, norm_topk_prob=True),
        "ernie4_5_moe": dict(intermediate_size=inter, moe_intermediate_size=inter, moe_num_experts=experts,
                             moe_k=top_k, moe_num_shared_experts=1, moe_layer_start_index=1,
                             tie_word_embeddings=False),
        "granitemoe": dict(intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=top_k,
                           embedding_multiplier=12.0, attention_multiplier=1 / 64, residual_multiplier=0.22,
                           logits_scaling=6.0),
        "phimoe": dict(intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=2),
        "hunyuan_v1_moe": dict(intermediate_size=inter, num_experts=experts, moe_topk=top_k),
        # alternating sliding-window (128) and full layers, sinks, biased experts
        "gpt_oss": dict(intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=top_k),
        # MoE every other layer (dense MLPs between), chunked attention, NoPE every fourth layer
        "llama4_text": dict(intermediate_size=inter, intermediate_size_mlp=2 * inter, num_local_experts=experts,
                            num_experts_per_tok=top_k, interleave_moe_layer_step=2),
        # gated DeltaNet in 3 of 4 layers, a sigmoid-gated shared expert
        "qwen3_next": dict(intermediate_size=inter, moe_intermediate_size=inter, shared_expert_intermediate_size=inter,
                           num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                           linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=64,
                           linear_value_head_dim=64, linear_conv_kernel_dim=4),
    }
    per_family["qwen3_5_moe_text"] = dict(per_family["qwen3_next"])
    if family not in per_family:
        raise SystemExit(f"--family {family!r}: one of {', '.join(per_family)}")
    return {**cfg, **per_family[family]}


def active_bytes_of(model, batch: int, dtype: torch.dtype) -> int:
    """As :func:`active_bytes_per_step`, read off a loaded moetier model (any family)."""
    from moetier.bench.shape import ModelShape

    shape = ModelShape.of(model, dtype)
    E, k = shape.num_experts, shape.top_k
    distinct = E * (1 - (1 - k / E) ** batch) if E else 0
    return int(shape.resident_bytes + shape.moe_layers * distinct * shape.expert_bytes)


def time_decode(run, new_tokens: int, repeats: int) -> float:
    """Seconds per decode step: time(1 + n tokens) - time(1 token), over n; median of repeats."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(1)
        t1 = time.perf_counter()
        run(1 + new_tokens)
        t2 = time.perf_counter()
        samples.append(((t2 - t1) - (t1 - t0)) / new_tokens)
    samples.sort()
    return samples[len(samples) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="mixtral", help="model_type of the synthetic model (default: mixtral)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/moetier-bench"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from moetier import LLM, SamplingParams

    dtype = getattr(torch, args.dtype)
    if args.family == "mixtral":  # the sizes of earlier runs, kept comparable
        cfg = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                   num_attention_heads=16, num_key_value_heads=4, num_local_experts=args.experts,
                   num_experts_per_tok=args.top_k, vocab_size=32000, max_position_embeddings=4096)
    else:
        cfg = family_config(args.family, args.hidden, args.intermediate, args.layers, args.experts, args.top_k)
    name = f"{args.family}-h{args.hidden}-i{args.intermediate}-l{args.layers}-e{args.experts}-{args.dtype}"
    folder = synthetic_checkpoint(args.dir / name, args.family, cfg, dtype)

    llm = LLM(folder, dtype=args.dtype)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    bw = copy_bandwidth()
    g = torch.Generator().manual_seed(0)
    for B in args.batch:
        prompts = torch.randint(0, cfg["vocab_size"], (B, args.prompt_len), generator=g)

        def ours(n):
            llm.generate([{"prompt_token_ids": p} for p in prompts.tolist()],
                         SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)

        def theirs(n):
            with torch.no_grad():
                ref.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)

        ours(2), theirs(2)  # warm up
        t_ours = time_decode(ours, args.new_tokens, args.repeats)
        t_ref = time_decode(theirs, args.new_tokens, args.repeats)
        nbytes = active_bytes_per_step(cfg, B, dtype.itemsize) if args.family == "mixtral" else \
            active_bytes_of(llm.model, B, dtype)
        limit = B / (nbytes / bw)
        emit({
            "bench": "decode_cpu", "model": name, "batch": B, "threads": torch.get_num_threads(),
            "moetier_tok_s": round(B / t_ours, 2), "transformers_tok_s": round(B / t_ref, 2),
            "ratio_vs_transformers": round(t_ref / t_ours, 3),
            "active_bytes_per_step": nbytes, "copy_bandwidth_gb_s": round(bw / 1e9, 2),
            "bandwidth_limit_tok_s": round(limit, 2), "fraction_of_limit": round(B / t_ours / limit, 3),
        })


if __name__ == "__main__":
    main()
