"""The same checks on a CUDA device; skipped (not passed) where no GPU exists."""

import pytest
import torch

from moetier import LLM, SamplingParams
from moetier.experts.setup import moe_blocks
from moetier.weights.loader import load_model
from tiny import assert_logits_close, make_checkpoint, moetier_logits, reference_greedy, reference_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CONFIGS = {
    "mixtral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, vocab_size=128),
    "qwen3_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                      num_experts_per_tok=2, vocab_size=128, norm_topk_prob=True),
    "deepseek_v3": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, vocab_size=128, first_k_dense_replace=1, kv_lora_rank=16,
                        q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=2,
                        topk_group=1),
}
IDS = [5, 17, 99, 3, 42, 42, 7, 120, 64, 1, 88, 23]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def ckpt(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(request.param), request.param, CONFIGS[request.param])


def test_logits_on_cuda_match_transformers(ckpt):
    model, _, _ = load_model(ckpt, device="cuda", dtype="float32")
    ref = reference_logits(ckpt, IDS)
    assert_logits_close(moetier_logits(model, IDS), ref, rel=1e-3)  # TF32/cuBLAS reorderings
    assert_logits_close(moetier_logits(model, IDS, split=5), ref, rel=1e-3)


def test_greedy_and_batch_on_cuda(ckpt):
    llm = LLM(ckpt, device="cuda", dtype="float32")
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = [IDS, IDS[:3], IDS * 2]
    batched = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    assert batched[0] == reference_greedy(ckpt, IDS, 16)
    single = [llm.generate([{"prompt_token_ids": p}], params)[0].outputs[0].token_ids for p in prompts]
    assert batched == single


def test_bfloat16_on_cuda_runs(ckpt):
    llm = LLM(ckpt, device="cuda", dtype="bfloat16")
    out = llm.generate([{"prompt_token_ids": IDS}], SamplingParams(max_tokens=8, temperature=0.7, seed=1))
    assert 1 <= len(out[0].outputs[0].token_ids) <= 8


@pytest.mark.parametrize("policy", ["lru", "activation"])
def test_offloaded_on_cuda_with_host_tier_is_bit_identical(ckpt, policy, tmp_path):
    """Disk -> pinned host tier -> device slots: same tokens and logprobs as all-resident on CUDA."""
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)
    prompts = [{"prompt_token_ids": IDS}, {"prompt_token_ids": IDS[:4]}]

    def run(llm):
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [(o.outputs[0].token_ids, [lp["logprob"] for lp in o.outputs[0].logprobs]) for o in outs]

    resident = LLM(ckpt, device="cuda", dtype="float32")
    want = run(resident)
    experts = moe_blocks(resident.model)[0].experts.num_experts
    llm = LLM(ckpt, device="cuda", dtype="float32", expert_slots=experts, host_memory="64MiB", offload_dir=tmp_path,
              cache_policy=policy)
    try:
        assert llm.engine.offload.store.host is not None
        assert run(llm) == want
        assert run(llm) == want
        s = llm.stats()
        assert s["host_hits"] > 0 and s["bytes_host_to_device"] > s["bytes_disk_to_host"]
    finally:
        llm.close()
