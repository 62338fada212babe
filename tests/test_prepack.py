"""bf16 weights pre-packed for oneDNN on the CPU give exactly the unpacked results."""

import pytest
import torch

from moetier import LLM, SamplingParams
from moetier.experts.setup import moe_blocks
from moetier.models import prepack as pp
from moetier.models.prepack import PackedLinear, prepack, supported
from moetier.weights.loader import load_model
from tiny import FAMILY_CONFIGS, MORE_FAMILY_CONFIGS, make_checkpoint, moetier_logits

ALL_CONFIGS = {**FAMILY_CONFIGS, **MORE_FAMILY_CONFIGS}

pytestmark = pytest.mark.skipif(not supported(torch.bfloat16), reason="no oneDNN bf16 packing on this CPU build")

IDS = [5, 17, 90, 3, 42, 42, 7, 64, 1]


@pytest.fixture(autouse=True)
def onednn_only(monkeypatch):
    """These tests are about oneDNN's packed layout: keep moetier's own kernels (tests/test_native.py), which
    read only plain weights and would otherwise take the few-row calls, out of the way."""
    import moetier.models.moe as moe

    monkeypatch.setattr(pp, "native_first", lambda: False)
    monkeypatch.setattr(pp, "has_native", lambda w: False)
    monkeypatch.setattr(moe, "fused_ok", lambda *a: False)
    monkeypatch.setenv("MOETIER_FUSED", "0")


@pytest.mark.parametrize("family", sorted(ALL_CONFIGS))
def test_packed_logits_are_bit_identical(family, tmp_path):
    folder = make_checkpoint(tmp_path, family, ALL_CONFIGS[family])
    model, _, _ = load_model(folder, "cpu", "bfloat16")
    want = moetier_logits(model, IDS, split=4)  # a prefill, then one token at a time
    assert prepack(model) > 0
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    assert all(b.experts.packed is not None for b in moe_blocks(model) if hasattr(b.experts, "packed"))
    assert torch.equal(moetier_logits(model, IDS, split=4), want)


@pytest.fixture
def upcast_from(monkeypatch):
    """Fix the wide-matmul threshold (``MOETIER_UPCAST_ROWS``) for one test."""
    def set_rows(rows: int) -> None:
        monkeypatch.setenv(pp.UPCAST_ENV, str(rows))
        pp.upcast_rows.cache_clear()
    yield set_rows
    pp.upcast_rows.cache_clear()


def _wide_case(rows=64):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(768, 512, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 512, generator=g).to(torch.bfloat16)
    b = torch.randn(768, generator=g).to(torch.bfloat16)
    return x, w, b


def test_upcast_linear_is_float32_math_on_the_bf16_values():
    x, w, b = _wide_case()
    want = (x.double() @ w.double().T + b.double()).float()  # exact products, fp64 sums
    for weight in (w, pp.pack_weight(w)):  # packed weights unpack to the same values
        got = pp.upcast_linear(x, weight, b)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, pp.upcast_linear(x, w, b))
        # within one bf16 rounding of the exact result, and no further from it than the bf16 kernel
        # (which also rounds once on AMX cores: equal up to the float32 summation of the errors)
        err = (got.float() - want).abs()
        assert (err <= want.abs() * 2**-8 + 1e-6).all()
        assert err.sum() <= (torch.nn.functional.linear(x, w, b).float() - want).abs().sum() * (1 + 1e-4)


def test_linear_takes_the_float32_path_from_the_threshold_on(upcast_from):
    x, w, b = _wide_case()
    kernel, wide = torch.nn.functional.linear(x, w, b), pp.upcast_linear(x, w, b)
    assert not torch.equal(kernel, wide)  # the two paths are distinguishable on this input
    packed = pp.pack_weight(w)
    upcast_from(64)
    assert torch.equal(pp.linear(x, w, b), wide) and torch.equal(pp.linear(x, packed, b), wide)
    upcast_from(65)
    assert torch.equal(pp.linear(x, w, b), kernel) and torch.equal(pp.linear(x, packed, b), kernel)
    upcast_from(0)
    assert pp.upcast_rows(1) == pp.NEVER
    upcast_from(-3)
    assert pp.upcast_rows(1) == pp.NEVER


def test_bad_upcast_setting_names_the_variable(upcast_from):
    upcast_from("many")
    with pytest.raises(ValueError, match="MOETIER_UPCAST_ROWS"):
        pp.upcast_rows(1)


def test_probe_picks_a_row_count_it_measured():
    pp.upcast_rows.cache_clear()
    rows = pp.upcast_rows(torch.get_num_threads())
    assert rows == pp.NEVER or rows in pp.PROBE_ROWS


def test_resident_packed_equals_offloaded_unpacked_experts(tmp_path, upcast_from):
    """Offloaded experts are slot views (never packed): still bit-identical to packed resident ones,
    on the bf16 kernels and on the float32 path alike."""
    cfg = dict(FAMILY_CONFIGS["mixtral"], hidden_size=512, intermediate_size=768)  # wide enough for the paths to differ
    folder = make_checkpoint(tmp_path / "m", "mixtral", cfg)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    prompts = [{"prompt_token_ids": IDS}, {"prompt_token_ids": IDS[:3]}]

    def run(llm):
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [(o.outputs[0].token_ids, [lp["logprob"] for lp in o.outputs[0].logprobs]) for o in outs]

    resident = LLM(folder, dtype="bfloat16")
    assert moe_blocks(resident.model)[0].experts.packed is not None
    offloaded = LLM(folder, dtype="bfloat16", expert_slots=6, offload_dir=tmp_path / "off")
    try:
        got = {}
        for rows in (0, 2):  # never upcast; upcast every call of two rows or more
            upcast_from(rows)
            got[rows] = run(resident)
            assert run(offloaded) == got[rows]
        assert got[0] != got[2]  # the float32 path ran
    finally:
        offloaded.close()
