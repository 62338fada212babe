"""Every path that loads a weight gives the kernels the same storage: dtype, shape, strides, layout
and alignment. Offload identity holds because of this, on any CPU — not because one CPU's GEMM
happens to ignore an operand's alignment — so these checks fail on every machine if a path drifts."""

import pytest
import torch

from moetier import LLM
from moetier.experts.setup import moe_blocks
from moetier.weights.loader import is_expert_param
from moetier.weights.packed_write import convert
from tiny import FAMILY_CONFIGS, make_checkpoint

CACHE_LINE = 64  # the widest vector load; kernels may take another path for an operand not aligned to it


def signature(t: torch.Tensor) -> tuple:
    """What a kernel can see of a weight besides its values."""
    if t.layout != torch.strided:  # oneDNN's blocked layout: opaque, its own allocation
        return (t.layout, t.dtype, tuple(t.shape))
    return (t.layout, t.dtype, tuple(t.shape), t.stride(), t.data_ptr() % CACHE_LINE)


def dense_signatures(model) -> dict[str, tuple]:
    """Every materialised parameter and buffer (routed experts of an offloaded model excluded: on meta)."""
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {name: signature(t) for name, t in named if t.device.type != "meta"}


def resident_experts(llm) -> dict[tuple[int, int], tuple]:
    out = {}
    for layer, block in enumerate(moe_blocks(llm.model)):
        for e in range(block.experts.num_experts):
            out[(layer, e)] = tuple(signature(t) for t in block.experts.weights(e))
    return out


def slot_experts(llm) -> dict[tuple[int, int], tuple]:
    """The tensors the expert store hands the math, for every expert, loaded into its slots."""
    store = llm.engine.offload.store
    out = {}
    for layer, block in enumerate(moe_blocks(llm.model)):
        for e in range(block.experts.num_experts):
            got = store.acquire(layer, [e])
            out[(layer, e)] = tuple(signature(t) for t in got[e])
            store.release(layer)
    return out


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def checkpoint(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(request.param), request.param, FAMILY_CONFIGS[request.param])


def test_packed_folder_loads_into_the_same_storage_as_its_hf_folder(checkpoint, tmp_path):
    from_hf = LLM(checkpoint, dtype="float32")
    convert(checkpoint, tmp_path / "packed", dtype="float32")
    from_packed = LLM(tmp_path / "packed", dtype="float32")
    assert dense_signatures(from_packed.model) == dense_signatures(from_hf.model)
    assert resident_experts(from_packed) == resident_experts(from_hf)


def test_offloaded_model_uses_the_same_storage_as_resident(checkpoint, tmp_path):
    resident = LLM(checkpoint, dtype="float32")
    experts = moe_blocks(resident.model)[0].experts.num_experts
    offloaded = LLM(checkpoint, dtype="float32", expert_slots=experts, offload_dir=tmp_path)
    try:
        want = dense_signatures(resident.model)
        got = dense_signatures(offloaded.model)
        # the routed experts' matrices are offloaded; their biases (gpt-oss) stay resident
        assert got == {k: v for k, v in want.items() if not is_expert_param(k)}
        assert slot_experts(offloaded) == resident_experts(resident)
        # and every weight starts on a cache line, whichever path loaded it
        assert {s[-1] for s in got.values()} == {0}
    finally:
        offloaded.close()


def test_signature_sees_an_unaligned_copy():
    """The check above can fail: the same values at another alignment have another signature."""
    w = torch.randn(8, 16)
    raw = torch.empty(w.numel() + 6)
    shifted = raw[6:].view(8, 16).copy_(w)  # 24 bytes past an aligned start, as a safetensors header leaves it
    assert torch.equal(shifted, w) and signature(shifted) != signature(w)
    assert signature(w.t().contiguous().t()) != signature(w)  # and other strides
