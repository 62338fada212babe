"""bf16 weights pre-packed for oneDNN on the CPU give exactly the unpacked results."""

import pytest
import torch

from moetier import LLM, SamplingParams
from moetier.experts.setup import moe_blocks
from moetier.models.prepack import PackedLinear, prepack, supported
from moetier.weights.loader import load_model
from tiny import FAMILY_CONFIGS, make_checkpoint, moetier_logits

pytestmark = pytest.mark.skipif(not supported(torch.bfloat16), reason="no oneDNN bf16 packing on this CPU build")

IDS = [5, 17, 90, 3, 42, 42, 7, 64, 1]


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_packed_logits_are_bit_identical(family, tmp_path):
    folder = make_checkpoint(tmp_path, family, FAMILY_CONFIGS[family])
    model, _, _ = load_model(folder, "cpu", "bfloat16")
    want = moetier_logits(model, IDS, split=4)  # a prefill, then one token at a time
    assert prepack(model) > 0
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    assert all(b.experts.packed is not None for b in moe_blocks(model) if hasattr(b.experts, "packed"))
    assert torch.equal(moetier_logits(model, IDS, split=4), want)


def test_resident_packed_equals_offloaded_unpacked_experts(tmp_path):
    """Offloaded experts are slot views (never packed): still bit-identical to packed resident ones."""
    folder = make_checkpoint(tmp_path / "m", "mixtral", FAMILY_CONFIGS["mixtral"])
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    prompts = [{"prompt_token_ids": IDS}, {"prompt_token_ids": IDS[:3]}]

    def run(llm):
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [(o.outputs[0].token_ids, [lp["logprob"] for lp in o.outputs[0].logprobs]) for o in outs]

    resident = LLM(folder, dtype="bfloat16")
    assert moe_blocks(resident.model)[0].experts.packed is not None
    offloaded = LLM(folder, dtype="bfloat16", expert_slots=6, offload_dir=tmp_path / "off")
    try:
        assert run(offloaded) == run(resident)
    finally:
        offloaded.close()
