"""Decoding sequences attend in one padded call, also beside prompt chunks in the same step:
the same result as one call per sequence."""

import pytest
import torch

from moetier.models.layers import attend, attend_batch
from moetier.runtime.batch import ForwardBatch
from moetier.runtime.kv_cache import SeqKV


@pytest.mark.parametrize("new", [[1, 1, 1, 1], [1, 3, 1, 1, 4], [5, 1]])  # new tokens per sequence this step
@pytest.mark.parametrize("window", [None, 3, 8])  # 8: windowed keys within the group; 3: too few, per sequence
@pytest.mark.parametrize("hq, hk", [(4, 2), (4, 4)])
def test_batched_equals_per_sequence(new, window, hq, hk):
    torch.manual_seed(0)
    d = 8
    cached = [1, 6, 2, 9, 4][: len(new)]  # tokens each sequence already holds
    caches, history = [], []
    for n in cached:
        c = SeqKV(1, 4, "cpu", torch.float32)
        k, v = torch.randn(hk, n, d), torch.randn(hk, n, d)
        c.write(0, 0, k, v)
        c.length = n
        caches.append(c)
        history.append((k, v))
    batch = ForwardBatch.build(caches, new, "cpu")
    T = sum(new)
    q, k_new, v_new = torch.randn(T, hq, d), torch.randn(T, hk, d), torch.randn(T, hk, d)
    group = batch.decode_group()
    assert (group is not None) == (new.count(1) >= 2)  # the padded call is what is under test
    got = attend_batch(batch, 0, q, (k_new, v_new), 0.3, window)  # [T, hq * d]
    for i, (k, v) in enumerate(history):
        a, b = batch.offsets[i], batch.offsets[i + 1]
        k_all = torch.cat([k, k_new[a:b].transpose(0, 1)], dim=1)
        v_all = torch.cat([v, v_new[a:b].transpose(0, 1)], dim=1)
        want = attend(q[a:b].transpose(0, 1), k_all, v_all, cached[i], 0.3, window)  # [n, hq * d]
        torch.testing.assert_close(got[a:b], want, rtol=1e-5, atol=1e-6)


def test_group_is_skipped_when_padding_would_dominate():
    caches = []
    for n in (3, 200, 2):  # one long cache: padding the short ones to it would read 3x the keys
        c = SeqKV(1, 4, "cpu", torch.float32)
        c.write(0, 0, torch.zeros(2, n, 8), torch.zeros(2, n, 8))
        c.length = n
        caches.append(c)
    assert ForwardBatch.build(caches, [1, 1, 1], "cpu").decode_group() is None
    assert ForwardBatch.build(caches[::2], [1, 1], "cpu").decode_group().seqs == [0, 1]
