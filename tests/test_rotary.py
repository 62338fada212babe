"""Rotary embedding: layers share one table and a step's angles are gathered once; the rotation
must still be exactly the textbook one for whatever positions and dtype each call brings."""

import math

import pytest
import torch

from moetier.models.args import RopeArgs
from moetier.models.layers import Rotary


def _reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin with the angles computed here in float64, then cast like the model."""
    d = x.shape[-1]
    inv = torch.tensor([1.0 / theta ** (2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    ang = positions.double()[:, None] * inv[None, :]  # [T, d/2]
    emb = torch.cat((ang, ang), dim=-1)
    cos, sin = emb.cos().float().to(x.dtype)[:, None], emb.sin().float().to(x.dtype)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_matches_reference_across_steps_layers_and_dtypes(dtype):
    torch.manual_seed(0)
    layers = [Rotary(16, RopeArgs(theta=500.0), 64) for _ in range(3)]
    x = torch.randn(4, 2, 16).to(dtype)
    steps = [torch.tensor([0, 1, 2, 3]), torch.tensor([7, 7, 30, 2]), torch.tensor([5, 6, 7, 8])]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    for pos in steps:  # each step's new positions must not get the previous step's angles
        want = _reference(x, pos, 500.0)
        for rot in layers:  # the second and third layer reuse the first one's gathered angles
            torch.testing.assert_close(rot(x, pos), want, **tol)
    for pos in steps:  # the same positions in another dtype must not get the memoised angles of the first
        torch.testing.assert_close(layers[0](x, pos), _reference(x, pos, 500.0), **tol)
        torch.testing.assert_close(layers[1](x.double(), pos), _reference(x.double(), pos, 500.0),
                                   atol=1e-6, rtol=1e-6)


def test_table_grows_past_its_first_size_and_far_positions_rotate_right():
    rot = Rotary(8, RopeArgs(theta=10000.0), 4096)
    x = torch.randn(2, 1, 8, dtype=torch.float64)
    small = torch.tensor([1, 2])
    rot(x, small)
    far = torch.tensor([3000, 5])  # beyond the first table (256 positions): it must grow
    torch.testing.assert_close(rot(x, far), _reference(x, far, 10000.0), atol=1e-3, rtol=1e-3)  # float32 angles
    cos, _ = rot._table(3001, "cpu")
    assert cos.shape[0] >= 3001
    assert cos[3000, 0].item() == pytest.approx(math.cos(3000.0), abs=1e-3)


def test_settings_that_differ_get_their_own_tables():
    pos = torch.tensor([9, 10])
    x = torch.randn(2, 1, 8)
    a = Rotary(8, RopeArgs(theta=10000.0), 4096)(x, pos)
    b = Rotary(8, RopeArgs(theta=100.0), 4096)(x, pos)
    c = Rotary(8, RopeArgs(theta=100.0, kind="linear", factor=4.0), 4096)(x, pos)
    torch.testing.assert_close(b, _reference(x, pos, 100.0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, b) and not torch.allclose(b, c)
