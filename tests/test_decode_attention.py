"""Decode steps attend all sequences in one padded call: same result as one call per sequence."""

import pytest
import torch

from moetier.models.layers import attend, attend_batch
from moetier.runtime.batch import ForwardBatch
from moetier.runtime.kv_cache import SeqKV


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("hq, hk", [(4, 2), (4, 4)])
def test_padded_decode_equals_per_sequence(window, hq, hk):
    torch.manual_seed(0)
    d, lengths = 8, [1, 6, 2, 9]  # cached tokens before this step, one sequence per entry
    caches, history = [], []
    for n in lengths:
        c = SeqKV(1, 4, "cpu", torch.float32)
        k, v = torch.randn(hk, n, d), torch.randn(hk, n, d)
        c.write(0, 0, k, v)
        c.length = n
        caches.append(c)
        history.append((k, v))
    batch = ForwardBatch.build(caches, [1] * len(lengths), "cpu")
    q, k_new, v_new = torch.randn(len(lengths), hq, d), torch.randn(len(lengths), hk, d), torch.randn(len(lengths), hk, d)
    got = attend_batch(batch, 0, q, (k_new, v_new), 0.3, window)  # [B, hq * d]
    for i, (k, v) in enumerate(history):
        k_all = torch.cat([k, k_new[i, :, None]], dim=1)
        v_all = torch.cat([v, v_new[i, :, None]], dim=1)
        want = attend(q[i : i + 1].transpose(0, 1), k_all, v_all, lengths[i], 0.3, window)  # [1, hq * d]
        torch.testing.assert_close(got[i : i + 1], want, rtol=1e-5, atol=1e-6)
