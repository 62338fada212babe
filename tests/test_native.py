"""moetier's own kernels (kernels/native): each against a reference computed here, the fused expert call and
the fused decode layer against the unfused path, and the fallback without a compiler."""

import os
import subprocess
import sys

import pytest
import torch

from moetier import LLM, SamplingParams
from moetier.kernels import native
from moetier.kernels.quant import QuantScheme, quantize

from tiny import kernel_rows

pytestmark = pytest.mark.skipif(not native.kinds(), reason="no C compiler or no AVX-512 here: torch's kernels serve")


@pytest.fixture
def native_up_to_16_rows(monkeypatch):
    """The native kernels up to 16 rows whatever this CPU's load-time probe would pick, so that batched calls
    are tested on every CPU."""
    from moetier.kernels.linear import NATIVE_ROWS_ENV, native_rows

    monkeypatch.setenv(NATIVE_ROWS_ENV, "17")
    native_rows.cache_clear()
    yield
    native_rows.cache_clear()


def _needs(kind):
    if kind and kind not in native.kinds():
        pytest.skip(f"no vectorized {kind} kernel on this CPU (it needs AVX-512 VNNI)")


@pytest.fixture(autouse=True)
def plain_bf16_weights(monkeypatch):
    """Keep bf16 weights plain (as on a CPU without AMX) so the fused path is tested on every CPU: with AMX the
    loader packs them for oneDNN, which the native kernels cannot read."""
    from moetier.models import prepack

    monkeypatch.setattr(prepack, "native_first", lambda: True)


def _weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[1, : min(40, k)] *= 20  # an outlier segment
    w[2] = 0  # an all-zero row
    return w


CASES = [("int8", None), ("int8", 32), ("int8", 64), ("int8", 512), ("int4", 32), ("int4", 64), ("int4", 128), ("int4", 256)]


@pytest.mark.parametrize("vectorized", [True, False])
# K 1056: two full groups of 16 int4 blocks and a short one (int8: two 512-spans and half a load); 1536: three
# spans (int8 groups of 512); only groups that divide K
@pytest.mark.parametrize("kind,group,K", [(k, g, K) for k, g in CASES for K in (256, 1056, 96, 1536)
                                          if (not g or K % g == 0) and (K == 1536) == (g == 512)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 6])  # one row, a partial block of 4 rows, 4 + 2 rows
def test_int_kernels_match_the_reference_on_quantized_rows(kind, group, K, vectorized, scale_dtype, M):
    N = 38  # not a multiple of the 64-row chunks threads take
    qw = quantize(_weight(N, K), QuantScheme(kind, group), dtype=scale_dtype, layout="rows" if kind == "int4" else None)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    xq, half_step = kernel_rows(x, kind)
    want = xq.double() @ qw.dequantize().double().T
    got = native.gemv(x, qw, vectorized=vectorized).double()
    assert ((got - want).abs() <= 1e-5 * want.abs().max() + 1e-5).all()
    # and the rows' quantization is what separates it from float activations: within half a step per input
    exact = x.double() @ qw.dequantize().double().T
    assert ((got - exact).abs() <= half_step.double() @ qw.dequantize().double().abs().T * 1.001 + 1e-4).all()


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("K", [1024, 100, 48])
@pytest.mark.parametrize("M", [1, 5])
def test_bf16_kernel_matches_float32_sums(K, vectorized, M):
    w = _weight(37, K).to(torch.bfloat16)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).float()  # bf16 values
    want = x.double() @ w.double().T
    got = native.gemv(x, w, vectorized=vectorized).double()
    assert ((got - want).abs() <= 1e-5 * want.abs().max()).all()
    out = native.gemv(x.to(torch.bfloat16), w, vectorized=vectorized)  # bf16 out: the float sum, rounded once
    assert out.dtype == torch.bfloat16 and ((out.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-6).all()


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("K", [1024, 100])
def test_a_bf16_row_gets_the_same_bits_in_any_batch(K, vectorized):
    """The bf16 kernel reads 1 or 4 weight rows at a time depending on the rows in the call; every output still
    sums in one order, so a row decoded together with others equals the row alone, bit for bit."""
    w = _weight(37, K).to(torch.bfloat16)
    x = torch.randn(16, K, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    alone = torch.cat([native.gemv(x[i : i + 1].float(), w, vectorized=vectorized) for i in range(16)])
    for M in (2, 3, 5, 16):
        assert torch.equal(native.gemv(x[:M].float(), w, vectorized=vectorized), alone[:M]), M


def test_a_bad_grouping_is_refused_before_anything_is_written():
    qw = quantize(_weight(8, 96), QuantScheme("int8", 96), dtype=torch.float32)
    bad = type(qw)(qw.kind, (8, 96), 48, qw.codes, qw.scales)  # 48: not 32, not a multiple of 64, not K
    out = torch.full((1, 8), 7.0)
    with pytest.raises(RuntimeError, match="refused"):
        native.gemv(torch.randn(1, 96), bad, out=out)
    assert torch.equal(out, torch.full((1, 8), 7.0))


@pytest.mark.parametrize("kind", [None, "int8", "int4"])
def test_fused_experts_equal_the_per_expert_path(kind, monkeypatch):
    """One native call for a token's experts gives the per-expert path's bits (same kernels, same roundings)."""
    import moetier.models.moe as moe

    _needs(kind)
    torch.manual_seed(0)
    ex = moe.Experts(8, 256, 384)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.05)
    torch.nn.init.normal_(ex.down_proj, std=0.05)
    ex = ex.to(torch.bfloat16)
    if kind:
        ex.quantize(QuantScheme(kind))
    x = torch.randn(1, 256).to(torch.bfloat16)
    ids, w = torch.tensor([[3, 5]]), torch.tensor([[0.6, 0.4]])
    assert moe.fused_ok(x, [ex.weights(3), ex.weights(5)])
    with torch.inference_mode():
        fused = ex(x, ids, w)
        monkeypatch.setattr(moe, "fused_ok", lambda *a: False)
        unfused = ex(x, ids, w)
    assert torch.equal(fused, unfused)


def test_the_fused_experts_silu_gives_torchs_bits_for_every_bf16_input():
    """The fused experts' vectorized silu (its own exp) equals torch's F.silu on every finite bf16 value, so the
    fused and unfused expert paths round alike."""
    import ctypes

    import torch.nn.functional as F

    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    g = every[torch.isfinite(every)].contiguous()
    out = torch.empty_like(g)
    native.lib().mt_silu_bf16(ctypes.c_void_p(g.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(g.numel()))
    ref = F.silu(g)
    differ = out.view(torch.int16) != ref.view(torch.int16)
    assert not differ.any(), list(zip(g[differ][:5].tolist(), out[differ][:5].tolist(), ref[differ][:5].tolist()))


@pytest.mark.parametrize("kind, dtype", [(None, torch.bfloat16), ("int8", torch.bfloat16), ("int4", torch.bfloat16),
                                         ("int8", torch.float32), ("int4", torch.float32)])  # float32 weights: torch's
def test_a_batch_of_tokens_in_one_call_equals_the_per_expert_path(kind, dtype, monkeypatch, native_up_to_16_rows):
    """Several tokens' experts in one native call (each expert once on all its tokens) give the bits of the
    per-expert path, which gathers each expert's rows, runs it and sums each token's weighted outputs. In float32
    nothing rounds to bf16 after silu, so there the C library's exp and torch's differ by an ulp now and then."""
    import moetier.models.moe as moe

    _needs(kind)
    torch.manual_seed(1)
    ex = moe.Experts(8, 256, 384)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.05)
    torch.nn.init.normal_(ex.down_proj, std=0.05)
    ex = ex.to(dtype)
    if kind:
        ex.quantize(QuantScheme(kind))
    x = torch.randn(6, 256).to(dtype)
    ids = torch.tensor([[3, 5], [5, 1], [0, 3], [7, 3], [5, 3], [6, 2]])  # expert 3 gets 4 rows, 6 and 2 one
    w = torch.softmax(torch.randn(6, 2), dim=-1)
    assert moe.fused_ok(x, [ex.weights(e) for e in range(8)], 4)
    calls, one_call = [], native.moe
    monkeypatch.setattr(native, "moe", lambda *a: calls.append(1) or one_call(*a))
    with torch.inference_mode():
        fused = ex(x, ids, w)
        monkeypatch.setattr(moe, "fused_ok", lambda *a: False)
        unfused = ex(x, ids, w)
    assert calls == [1]
    if dtype == torch.bfloat16:
        assert torch.equal(fused, unfused)
    else:
        torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-6)


def test_a_batch_with_a_slot_out_of_range_is_refused():
    gu, dn = torch.randn(64, 32).to(torch.bfloat16), torch.randn(32, 32).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="refused"):
        native.moe(torch.randn(2, 32).to(torch.bfloat16), [(gu, dn)], [0, 1], torch.ones(2, 1))


CFG = dict(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
           num_local_experts=4, num_experts_per_tok=2, vocab_size=512, max_position_embeddings=256)
QWEN3 = dict(hidden_size=256, intermediate_size=384, moe_intermediate_size=384, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
             vocab_size=512, max_position_embeddings=256, norm_topk_prob=True)
QWEN2 = dict(hidden_size=256, intermediate_size=384, moe_intermediate_size=384, shared_expert_intermediate_size=256,
             num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
             vocab_size=512, max_position_embeddings=256)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tiny import make_checkpoint

    root = tmp_path_factory.mktemp("native")
    return {fam: make_checkpoint(root / fam, fam, cfg)
            for fam, cfg in (("mixtral", CFG), ("qwen3_moe", QWEN3), ("qwen2_moe", QWEN2))}


class _path:
    """Run ``llm`` with the fused paths of ``level``: "token" (all installed: one call a token where the model
    takes it), "layer" (the per-layer fused path only) or "off" (the unfused layers)."""

    def __init__(self, llm, level: str):
        self.model, self.level = llm.model, level

    def __enter__(self):
        layers = self.model.model.layers
        self.saved = self.model.fused_token, [layer.fused for layer in layers]
        if self.level != "token":
            self.model.fused_token = None
        if self.level == "off":
            for layer in layers:
                layer.fused = None

    def __exit__(self, *exc):
        self.model.fused_token, fused = self.saved
        for layer, f in zip(self.model.model.layers, fused):
            layer.fused = f


def _decode(llm, level: str = "token", n=20):
    """Greedy tokens and every step's logits through the fused paths of ``level`` (:class:`_path`)."""
    with _path(llm, level):
        out = llm.generate([{"prompt_token_ids": list(range(3, 40))}],
                           SamplingParams(max_tokens=n, temperature=0, logprobs=1))
    o = out[0].outputs[0]
    return o.token_ids, [lp["logprob"] for lp in o.logprobs]


def _stepped(llm, level: str, ids, split):
    """Logits of every position, ``ids[split:]`` fed one decode step at a time (:class:`_path` ``level``)."""
    from tiny import moetier_logits

    with _path(llm, level):
        return moetier_logits(llm.model, ids, split=split)[split:].float()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_fused_decode_layer_agrees_with_the_unfused_layer(checkpoints, family, quant):
    """Teacher-forced decode steps: the fused layer's logits are as close to the float32 model's as the unfused
    layer's (the norms' and attention's sums run in another order, so bf16 roundings land elsewhere now and
    then: not bit for bit)."""
    llm = LLM(str(checkpoints[family]), dtype="bfloat16", quantization=quant)
    assert all(layer.fused is not None for layer in llm.model.model.layers)
    ids = list(range(3, 40)) + [int(t) for t in torch.randint(3, 500, (16,), generator=torch.Generator().manual_seed(5))]
    fused, plain = _stepped(llm, "layer", ids, 37), _stepped(llm, "off", ids, 37)
    ref = _stepped(LLM(str(checkpoints[family]), dtype="float32", quantization=quant), "off", ids, 37)
    err_fused, err_plain = (fused - ref).abs().max().item(), (plain - ref).abs().max().item()
    assert err_fused <= 1.5 * err_plain + 0.02 * ref.abs().max().item(), (err_fused, err_plain)


def test_fused_offloaded_experts_equal_resident_ones(checkpoints):
    ck = str(checkpoints["mixtral"])
    resident = _decode(LLM(ck, dtype="bfloat16", quantization="int4"), "layer")
    offloaded = LLM(ck, dtype="bfloat16", quantization="int4", expert_slots=4, offload_dir=str(checkpoints["mixtral"].parent / "off"))
    assert all(layer.fused is not None for layer in offloaded.model.model.layers)
    assert type(offloaded.model.model.layers[0].mlp.experts).__name__ == "OffloadedExperts"
    assert offloaded.model.fused_token is None  # experts come through the store
    assert _decode(offloaded) == resident


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_one_call_a_token_equals_the_fused_layers(checkpoints, family, quant):
    """All layers in one native call: the per-layer fused path's calls in the same order, so the same logits bit
    for bit (teacher-forced steps, then greedy decode); a layer with a shared expert keeps the per-layer path."""
    _needs(quant)
    llm = LLM(str(checkpoints[family]), dtype="bfloat16", quantization=quant)
    if family == "qwen2_moe":
        assert llm.model.fused_token is None
        return
    assert llm.model.fused_token is not None
    ids = list(range(3, 40)) + [int(t) for t in torch.randint(3, 500, (16,), generator=torch.Generator().manual_seed(6))]
    assert torch.equal(_stepped(llm, "token", ids, 37), _stepped(llm, "layer", ids, 37))
    assert _decode(llm, "token") == _decode(llm, "layer")


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_a_batch_in_one_call_equals_each_sequence_in_its_own(checkpoints, family, quant, monkeypatch,
                                                             native_up_to_16_rows):
    """Decode steps of several sequences in one native call (``mt_decode``) give every sequence the bits the
    one-token call gives it alone: the same generation with each step's rows sent one at a time instead."""
    from moetier.models.fused import FusedToken
    from moetier.runtime.batch import ForwardBatch

    _needs(quant)
    llm = LLM(str(checkpoints[family]), dtype="bfloat16", quantization=quant)
    assert llm.model.fused_token.max_batch == 16
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (37, 12, 25)]
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=2, ignore_eos=True)

    def run():
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)]

    call, calls = FusedToken.__call__, []
    monkeypatch.setattr(FusedToken, "__call__", lambda self, x, b: calls.append(x.shape[0]) or call(self, x, b))
    together = run()
    assert max(calls) == 3

    def one_at_a_time(self, x, batch):
        rows = [call(self, x[b : b + 1].clone(), ForwardBatch([batch.caches[b]], [batch.starts[b]], [1],
                                                              batch.positions[b : b + 1])) for b in range(x.shape[0])]
        return torch.cat(rows)

    monkeypatch.setattr(FusedToken, "__call__", one_at_a_time)
    assert run() == together
    with _path(llm, "layer"):  # the per-layer path (offloaded experts take it) in several calls a layer: the same
        assert run() == together


def test_without_the_native_kernels_the_same_folder_still_runs(checkpoints, tmp_path):
    """MOETIER_NATIVE=0 (as on a machine with no compiler): an int4 folder in moetier's "rows" order is read by
    the dequantizing path, and greedy tokens match this process's native run on a float32 model."""
    from moetier.weights.packed_write import convert

    out = tmp_path / "int4"
    convert(checkpoints["mixtral"], out, quant="int4", progress=False)
    code = ("import sys, json; from moetier import LLM, SamplingParams; from moetier.kernels import native;"
            "llm = LLM(sys.argv[1]); o = llm.generate([{'prompt_token_ids': list(range(3, 40))}],"
            " SamplingParams(max_tokens=12, temperature=0));"
            "print(json.dumps([sorted(native.kinds()), o[0].outputs[0].token_ids]))")
    env = {**os.environ, "MOETIER_NATIVE": "0"}
    res = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    kinds, tokens = __import__("json").loads(res.stdout.strip().splitlines()[-1])
    assert kinds == []
    llm = LLM(str(out))
    want = llm.generate([{"prompt_token_ids": list(range(3, 40))}], SamplingParams(max_tokens=12, temperature=0))
    # float32 activations: native int kernels quantize rows, the fallback does not -> compare the first tokens
    assert tokens[:4] == want[0].outputs[0].token_ids[:4]
