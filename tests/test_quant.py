"""Quantized weights: round trips within each scheme's bound, the int kernels against the dequantized
float32 reference, the int4 code orders against torch's own packing, GGUF block mappings, bad input."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moetier.kernels.linear import has_kernel, kernel_linear, quant_linear
from moetier.kernels.quant import (INT4_ORDERS, QuantError, QuantScheme, int4_from_codes, int4_kernel_layout,
                                   int8_from_codes, pack_int4, parse_scheme, quantize, unpack_int4)
from moetier.models.prepack import linear
from tiny import kernel_rows


def weight(n=128, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[3, :40] *= 20  # an outlier row segment: groups must keep it to themselves
    w[5] = 0  # an all-zero row: scale 0 must not divide by zero
    return w


@pytest.mark.parametrize("group", [None, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_round_trip_within_half_a_step(group, dtype):
    w = weight()
    qw = quantize(w, QuantScheme("int8", group), dtype=dtype)
    G = group or w.shape[1]
    assert qw.codes.dtype == torch.int8 and qw.scales.shape == (128, 256 // G) and qw.scales.dtype == dtype
    step = w.view(128, -1, G).abs().amax(-1, keepdim=True) / 127  # computed here, not by the code under test
    slack = 1 + (2 ** -7 if dtype == torch.bfloat16 else 1e-6)  # the scale rounded to its dtype
    err = (qw.dequantize().view(128, -1, G) - w.view(128, -1, G)).abs()
    assert (err <= step * 0.5 * slack * 1.0001 + 127 * step * (slack - 1) + 1e-12).all()
    assert torch.equal(qw.dequantize()[5], torch.zeros(256))


@pytest.mark.parametrize("layout", ["rows", "b64s"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_round_trip_within_half_a_step(group, dtype, layout):
    w = weight()
    qw = quantize(w, QuantScheme("int4", group), dtype=dtype, layout=layout)
    pairs = (128, 256 // group, 2) if layout == "rows" else (256 // group, 128, 2)  # row- / group-major
    assert qw.codes.shape == (128, 128) and qw.scales.shape == pairs
    wg = w.view(128, -1, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    # float32 parameters: half a step; bf16 ones: plus their rounding (relative 2^-8 of the range ends)
    slack = 1e-5 * step if dtype == torch.float32 else 2 ** -8 * (lo.abs() + hi.abs() + 16 * step)
    err = (qw.dequantize().view(128, -1, group) - wg).abs()
    assert (err <= 0.5 * step + slack + 1e-7).all()
    codes = unpack_int4(qw.codes, qw.layout)
    assert codes.max() <= 15 and codes.min() >= 0
    assert torch.equal(qw.dequantize()[5], torch.zeros(256))


@pytest.mark.parametrize("layout", sorted(INT4_ORDERS))
@pytest.mark.parametrize("rows", [128, 96, 80, 48, 16, 6])
@pytest.mark.parametrize("cols", [64, 1024 + 96])  # "rows" order: whole groups of 16 blocks and a short last one
def test_int4_pack_unpack_round_trip(layout, rows, cols):
    q = torch.randint(0, 16, (rows, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    packed = pack_int4(q, layout)
    assert packed.shape == (rows, cols // 2)
    assert torch.equal(unpack_int4(packed, layout), q)


def test_int4_rows_order_is_gguf_blocks_interleaved_by_16():
    """The "rows" byte order written out by hand: byte i of 32-block j (GGUF order: q[i] | q[i+16] << 4) of a
    full group of 16 blocks sits at 4 * 16 * (i // 4) + 4 * j + i % 4."""
    q = torch.randint(0, 16, (2, 512), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    packed = pack_int4(q, "rows")
    for r in range(2):
        for j in (0, 5, 15):
            for i in (0, 3, 4, 13, 15):
                want = int(q[r, 32 * j + i]) | int(q[r, 32 * j + i + 16]) << 4
                assert int(packed[r, 64 * (i // 4) + 4 * j + i % 4]) == want


@pytest.mark.parametrize("rows", [128, 96, 80, 16])
def test_int4_layout_is_torchs_packing_on_this_cpu(rows):
    layout = int4_kernel_layout()
    if layout is None:
        pytest.skip("this torch's int4 packing is in no known order (the float32 path serves int4)")
    q = torch.randint(0, 16, (rows, 256), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pack_int4(q.to(torch.uint8), layout), torch._convert_weight_to_int4pack_for_cpu(q, 2))


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


@pytest.mark.parametrize("capability,want", [("avx2", "b32s"), ("default", "b32i")])
def test_int4_layout_follows_the_vector_width(capability, want):
    """torch packs int4 codes per its CPU kernel's vector width; the probe names the order each uses."""
    if capability == "avx2" and "avx2" not in _cpu_flags():
        pytest.skip("no AVX2 here")
    code = "from moetier.kernels.quant import int4_kernel_layout as f; print(f())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": capability},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == want


def _reference(x, qw):
    return x.float() @ qw.dequantize(torch.float32).T


@pytest.mark.parametrize("kind,group", [("int8", None), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_int_kernel_matches_the_dequantized_reference(kind, group, dtype, rows):
    """torch's int kernels (moetier's own: tests/test_native.py)."""
    qw = quantize(weight(), QuantScheme(kind, group), dtype=dtype, layout=int4_kernel_layout())
    if not has_kernel(qw):
        pytest.skip(f"no {kind} kernel for this layout on this CPU")
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(2)).to(dtype)
    ref = _reference(x, qw)
    got = kernel_linear(x, qw).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: the output's rounding and the kernel's bf16 steps
    assert (got - ref).abs().max() <= tol * ref.abs().max()


def test_int4_kernel_convention_is_q_minus_8_times_scale_plus_zero():
    """torch's CPU int4 kernel computes w = (q - 8) * scale + zero: fed plain codes and pairs, it agrees."""
    if int4_kernel_layout() is None:
        pytest.skip("no int4 kernel here")
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (64, 64), dtype=torch.int32, generator=g)
    sz = torch.rand(2, 64, 2, generator=g)  # [K/G, N, (scale, zero)]
    x = torch.randn(2, 64, generator=g)
    w = (q.float() - 8) * sz[..., 0].repeat_interleave(32, 0).T + sz[..., 1].repeat_interleave(32, 0).T
    got = torch._weight_int4pack_mm_for_cpu(x, torch._convert_weight_to_int4pack_for_cpu(q, 2), 32, sz)
    torch.testing.assert_close(got, x @ w.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind,group", [("int8", None), ("int8", 32), ("int4", 32)])
@pytest.mark.parametrize("rows", [1, 64, 300])
def test_linear_dispatch_agrees_with_the_reference_at_every_width(kind, group, rows):
    """``linear`` (the one entry point) on a QuantWeight: int kernel or float32 path, same function."""
    qw = quantize(weight(), QuantScheme(kind, group), dtype=torch.float32)
    x = torch.randn(2, rows, 256, generator=torch.Generator().manual_seed(4))
    bias = torch.randn(128)
    want = _reference(x, qw) + bias
    # moetier's own few-row kernels quantize the rows to int8 per 32 inputs (as llama.cpp does): each input is
    # off by at most half its group's step, max|x| / 127 / 2, so an output by at most sum_k |w_k| * that
    step = kernel_rows(x, kind)[1]
    bound = step @ qw.dequantize().abs().T * 1.001 + 1e-3 + 1e-4 * want.abs()
    assert ((linear(x, qw, bias) - want).abs() <= bound).all()
    assert quant_linear(x, qw).shape == (2, rows, 128)


def test_gguf_q4_0_and_q8_0_blocks_map_exactly():
    """Q4_0: w = d * (q - 8), d float16 per 32 weights; Q8_0: w = d * q. Both carried over exactly."""
    g = torch.Generator().manual_seed(5)
    q4 = torch.randint(0, 16, (32, 64), dtype=torch.uint8, generator=g)
    d = (torch.rand(32, 2, generator=g) * 0.1).half()
    qw = int4_from_codes(q4, d, -8 * d.float())
    want = (q4.float() - 8).view(32, 2, 32) * d.float()[..., None]
    assert torch.equal(qw.dequantize(), want.view(32, 64))
    assert not qw.scales[..., 1].any() and qw.scales.dtype == torch.float16  # zero = 0 exactly
    q8 = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=g)
    qw8 = int8_from_codes(q8, d)
    assert qw8.group_size == 32 and torch.equal(qw8.dequantize(), (q8.float().view(32, 2, 32) * d.float()[..., None]).view(32, 64))


def test_bad_schemes_are_named():
    with pytest.raises(QuantError, match="group size 48 does not divide the input dimension 64"):
        quantize(torch.randn(8, 64), QuantScheme("int8", 48))
    with pytest.raises(QuantError, match="int4 group size must be one of 32, 64, 128, 256"):
        parse_scheme("int4", 16)
    with pytest.raises(QuantError, match="quantization 'int3' is not supported"):
        parse_scheme("int3")
    with pytest.raises(QuantError, match="positive integer"):
        parse_scheme("int8", 0)
    assert parse_scheme("none") is None and parse_scheme("int4") == QuantScheme("int4", None)
