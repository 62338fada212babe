"""Decoding sequences attend in one padded call, also beside prompt chunks in the same step, and
straight on a KV pool: the same result as one call per sequence."""

import pytest
import torch

from moetier.models.layers import attend, attend_batch
from moetier.runtime.batch import ForwardBatch
from moetier.runtime.kv_cache import KVPool, SeqKV


@pytest.mark.parametrize("new", [[1, 1, 1, 1], [1, 3, 1, 1, 4], [5, 1]])  # new tokens per sequence this step
@pytest.mark.parametrize("window", [None, 3, 8])  # 8: windowed keys within the group; 3: too few, per sequence
@pytest.mark.parametrize("hq, hk", [(4, 2), (4, 4)])
@pytest.mark.parametrize("pooled", [False, True])
def test_batched_equals_per_sequence(new, window, hq, hk, pooled):
    torch.manual_seed(0)
    d = 8
    cached = [1, 6, 2, 9, 4][: len(new)]  # tokens each sequence already holds
    pool = KVPool(1, 12, 16, "cpu", torch.float32) if pooled else None
    if pooled:  # before the batch's rows: a sequence outside this step's batch, and a freed slot
        pool.take().write(0, 0, torch.randn(hk, 3, d), torch.randn(hk, 3, d))
        pool.take().release()
    caches, history = [], []
    for n in cached:
        c = pool.take() if pooled else SeqKV(1, 4, "cpu", torch.float32)
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
    if new == [1, 1, 1, 1]:  # the others attend on the pool only where padding stays cheap (below)
        assert (group.pool is not None) == pooled
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


def test_pool_slots_are_reused_lowest_first_and_a_row_can_be_outgrown():
    pool = KVPool(2, 3, 4, "cpu", torch.float32)
    a, b, c = (pool.take() for _ in range(3))
    assert [a.slot, b.slot, c.slot] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="all 3 KV pool slots"):
        pool.take()
    c.release()
    a.release()
    assert pool.take().slot == 0
    k = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)
    b.write(0, 0, k[:, :4], k[:, :4])
    assert b.pooled(0) and torch.equal(pool.layers[0][0][1], k[:, :4])  # the row holds the values
    got, _ = b.write(0, 4, k[:, 4:], k[:, 4:])  # past the row's capacity: moves to its own buffers
    assert not b.pooled(0) and b.pooled(1) and torch.equal(got, k)


@pytest.mark.parametrize("window", [None, 4])
def test_pool_call_covers_rows_of_other_sequences_in_between(window):
    """Decoding rows 0, 2, 4 of a pool; row 1 prefills in the same step, row 3 is a sequence outside
    the step: one call over rows 0-4, each decoding sequence's result as if it attended alone."""
    torch.manual_seed(1)
    hq, hk, d, n = 4, 2, 8, 6
    pool = KVPool(1, 5, 16, "cpu", torch.float32)
    caches = [pool.take() for _ in range(5)]
    history = []
    for c in caches:
        k, v = torch.randn(hk, n, d), torch.randn(hk, n, d)
        c.write(0, 0, k, v)
        c.length = n
        history.append((k, v))
    step = [caches[0], caches[1], caches[2], caches[4]]
    new = [1, 3, 1, 1]
    batch = ForwardBatch.build(step, new, "cpu")
    group = batch.decode_group()
    assert group.pool is pool and group.pool_rows == (0, 5)
    T = sum(new)
    q, k_new, v_new = torch.randn(T, hq, d), torch.randn(T, hk, d), torch.randn(T, hk, d)
    got = attend_batch(batch, 0, q, (k_new, v_new), 0.3, window)
    for i, (k, v) in enumerate(history[:3] + history[4:]):
        a, b = batch.offsets[i], batch.offsets[i + 1]
        k_all = torch.cat([k, k_new[a:b].transpose(0, 1)], dim=1)
        v_all = torch.cat([v, v_new[a:b].transpose(0, 1)], dim=1)
        want = attend(q[a:b].transpose(0, 1), k_all, v_all, n, 0.3, window)
        torch.testing.assert_close(got[a:b], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(caches[3].write(0, n, k_new[:0].transpose(0, 1), v_new[:0].transpose(0, 1))[0],
                               history[3][0])  # the outsider's cache is untouched
