"""Where a batch-1 decode token's time goes: the weight-streaming matmuls vs everything else.

In one process, alternating, each round times moetier's decode steps (``Engine.step``, one token)
and a replay of the same step's weight-streaming matmuls alone (every layer's q/k/v/o projections,
router, two experts' gate_up and down, the LM head; same packed weights, same kernel). The
difference is the per-token overhead (Python, norms, rotary, attention on the KV cache, routing,
dispatch, KV writes, sampling). Also counts the step's top-level ATen ops, and, given a bf16 GGUF
of the same model (``bench/gguf_peer.py`` makes one), times llama.cpp's decode in the same rounds.
Prints one JSON object (medians over all rounds' steps).

    python bench/decode_overhead.py --threads 2 [--gguf model.bf16.gguf]
    python bench/decode_overhead.py --layers 2 --rounds 2    # a fast smoke run
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, synthetic_checkpoint  # noqa: E402


def weights_replay(model, experts_per_layer: list[list[int]]):
    """A function running one decode token's weight-streaming matmuls and nothing else."""
    from moetier.models.prepack import linear

    H = model.args.hidden_size
    dtype = next(model.parameters()).dtype
    x = torch.randn(1, H).to(dtype)
    xi = torch.randn(1, model.model.layers[0].mlp.experts.down_proj.shape[-1]).to(dtype)
    xo = torch.randn(1, model.model.layers[0].self_attn.o_proj.in_features).to(dtype)

    def run():
        with torch.inference_mode():
            for layer, chosen in zip(model.model.layers, experts_per_layer):
                a = layer.self_attn
                a.q_proj(x), a.k_proj(x), a.v_proj(x), a.o_proj(xo)
                torch.nn.functional.linear(x, layer.mlp.gate.weight)
                for e in chosen:
                    gate_up, down = layer.mlp.experts.weights(e)
                    linear(x, gate_up), linear(xi, down)
            model.lm_head(x)
    return run


def top_level_ops(engine) -> tuple[int, list]:
    """ATen ops called from Python during one decode step (not counting ops inside other ops)."""
    from torch.profiler import profile

    with profile() as p:
        engine.step()
    counts = collections.Counter(
        ev.name for ev in p.events()
        if ev.cpu_parent is None or not ev.cpu_parent.name.startswith(("aten::", "mkldnn::")))
    return sum(counts.values()), counts.most_common(12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=16, help="decode steps timed per round")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gguf", type=Path, default=None, help="a bf16 GGUF of the same model: llama.cpp as the peer")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/moetier-bench"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from moetier import LLM, SamplingParams

    cfg = dict(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
               num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
               vocab_size=32000, max_position_embeddings=4096)
    name = f"mixtral-h{a.hidden}-i{a.intermediate}-l{a.layers}-e8-bfloat16"
    folder = synthetic_checkpoint(a.dir / name, "mixtral", cfg, torch.bfloat16)
    llm = LLM(folder, dtype="bfloat16")
    engine = llm.engine
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg["vocab_size"], (a.prompt_len,), generator=g).tolist()
    replay = weights_replay(llm.model, torch.randint(0, 8, (a.layers, 2), generator=g).tolist())
    params = SamplingParams(max_tokens=a.tokens + 2, temperature=0, ignore_eos=True)
    if a.gguf is not None:
        from gguf_peer import decode_latency

    step_s, weights_s, peer_s, ops = [], [], [], None
    for r in range(a.rounds + 1):  # round 0 warms up
        engine.add_request(str(r), prompt, params)
        engine.step()  # the prompt
        if ops is None:
            ops = top_level_ops(engine)
        while engine.has_unfinished():
            t = time.perf_counter()
            engine.step()
            s = time.perf_counter() - t
            t = time.perf_counter()
            replay()
            w = time.perf_counter() - t
            if r:
                step_s.append(s), weights_s.append(w)
        if a.gguf is not None:
            times = decode_latency(a.gguf, prompt, a.tokens + 1, threads=a.threads)["decode_s"]
            if r:
                peer_s += times

    step, weights = statistics.median(step_s) * 1e3, statistics.median(weights_s) * 1e3
    out = {"bench": "decode_overhead", "model": name, "threads": a.threads, "steps": len(step_s),
           "step_ms": round(step, 2), "weights_only_ms": round(weights, 2), "other_ms": round(step - weights, 2),
           "other_fraction": round((step - weights) / step, 3), "top_level_ops_per_step": ops[0],
           "most_common_ops": ops[1]}
    if peer_s:
        peer = statistics.median(peer_s) * 1e3
        out.update(llama_cpp_ms=round(peer, 2), ratio_vs_llama_cpp=round(peer / step, 3))
    emit(out)


if __name__ == "__main__":
    main()
