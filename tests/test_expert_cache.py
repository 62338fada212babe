"""Expert store, replacement policies and the trace library, on their own."""

import threading

import numpy as np
import pytest
import torch

from moetier.experts.cache import ActivationPolicy, LFUPolicy, LRUPolicy, make_policy
from moetier.experts.sources import TensorSource
from moetier.experts.store import ExpertStore
from moetier.experts.trace import TraceLibrary

L, E, H, I = 3, 6, 16, 8


@pytest.fixture
def source():
    g = torch.Generator().manual_seed(0)
    return TensorSource([torch.randn(E, 2 * I, H, generator=g) for _ in range(L)],
                        [torch.randn(E, H, I, generator=g) for _ in range(L)])


def test_lru_evicts_least_recent():
    p = LRUPolicy()
    for k in [(0, 0), (0, 1), (0, 2), (0, 0)]:
        p.touch(k)
    assert p.victim([(0, 0), (0, 1), (0, 2)], layer=0) == (0, 1)


def test_lru_evicts_never_used_prefetches_first():
    # a prefetched expert that was never used must not outlive every used one (it would pin its slot)
    p = LRUPolicy()
    for k in [(0, 0), (0, 1)]:
        p.touch(k)
    assert p.victim([(0, 0), (0, 1), (1, 3)], layer=0) == (1, 3)


def test_lfu_evicts_least_frequent():
    p = LFUPolicy()
    for k in [(0, 0), (0, 0), (0, 1), (0, 2), (0, 2)]:
        p.touch(k)
    assert p.victim([(0, 0), (0, 1), (0, 2)], layer=0) == (0, 1)


def test_activation_keeps_predicted_and_near_experts():
    p = ActivationPolicy(num_layers=4)
    pred = np.zeros((4, 2))
    pred[1, 0] = 0.5  # likely, next layer
    pred[3, 0] = 0.5  # as likely, but three layers away
    pred[2, 1] = 0.9  # very likely, two layers away
    p.set_prediction(pred)
    assert p.victim([(1, 0), (3, 0), (2, 1)], layer=0) == (3, 0)
    assert p.victim([(1, 0), (0, 1)], layer=0) == (0, 1)  # never predicted goes first


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown cache policy 'fifo'"):
        make_policy("fifo", 2)


def test_store_returns_exact_weights_and_respects_slots(source):
    store = ExpertStore(source, num_slots=E, policy=LRUPolicy())
    try:
        for layer in range(L):
            got = store.acquire(layer, [0, 3, 5])
            for e, (gu, dn) in got.items():
                assert torch.equal(gu, source.gate_up[layer][e]) and torch.equal(dn, source.down[layer][e])
            store.release(layer)
            assert len(store.resident()) <= E
        assert store.nbytes == E * store.slot_bytes
        s = store.stats.as_dict()
        assert s["misses"] == 9 and s["hits"] == 0 and s["evictions"] == 3
        store.acquire(2, [0, 3])  # still resident
        assert store.stats.hits == 2
    finally:
        store.close()


def test_store_refuses_more_experts_than_slots(source):
    store = ExpertStore(source, num_slots=2, policy=LRUPolicy())
    try:
        with pytest.raises(RuntimeError, match="2 slots, too few"):
            store.acquire(0, [0, 1, 2])
    finally:
        store.close()


def test_prefetch_is_counted_and_not_duplicated(source):
    calls = []
    lock = threading.Lock()
    orig = source.read_into

    def counting(layer, expert, out):
        with lock:
            calls.append((layer, expert))
        orig(layer, expert, out)

    source.read_into = counting
    store = ExpertStore(source, num_slots=4, policy=LRUPolicy())
    try:
        assert store.prefetch([(1, 2), (1, 3)], layer=0) == 2
        assert store.prefetch([(1, 2), (1, 3)], layer=0) == 0  # already resident or in flight
        got = store.acquire(1, [2, 3])
        assert torch.equal(got[2][0], source.gate_up[1][2])
        store.release(1)
        assert sorted(calls) == [(1, 2), (1, 3)]
        s = store.stats
        assert s.prefetched == 2 and s.prefetch_hits + s.prefetch_late == 2
    finally:
        store.close()


def test_protected_prefetches_are_not_evicted(source):
    store = ExpertStore(source, num_slots=3, policy=LRUPolicy())
    try:
        store.acquire(0, [0, 1])
        store.release(0)
        store.prefetch([(1, 0)], layer=0)
        store.acquire(2, [4, 5])  # must evict (0, 0) and (0, 1), never the protected (1, 0)
        store.release(2)
        assert store.stats.evictions == 2 and store.stats.wasted_prefetches == 0
        misses = store.stats.misses
        store.acquire(1, [0])
        assert store.stats.prefetch_hits + store.stats.prefetch_late == 1
        assert store.stats.misses - misses == store.stats.prefetch_late  # no second read
        store.end_step()
    finally:
        store.close()


def test_read_errors_reach_the_forward_pass(source):
    def broken(layer, expert, out):
        raise OSError("disk on fire")

    source.read_into = broken
    store = ExpertStore(source, num_slots=2, policy=LRUPolicy())
    try:
        with pytest.raises(OSError, match="disk on fire"):
            store.acquire(0, [1])
        assert store.resident() == set()
    finally:
        store.close()


def test_trace_library_merges_and_stays_bounded(tmp_path):
    lib = TraceLibrary(2, 4, capacity=3, merge_threshold=0.99)
    a = np.array([[5, 0, 0, 0], [0, 5, 0, 0]])
    lib.add(a)
    lib.add(a * 2)  # same direction: merged
    assert len(lib) == 1 and lib.weights[0] == 2
    rng = np.random.default_rng(0)
    for _ in range(10):
        lib.add(rng.integers(0, 5, (2, 4)))
    assert len(lib) == 3 and lib.weights.sum() == 12
    path = tmp_path / "lib.npz"
    lib.save(path)
    back = TraceLibrary.load(path, 2, 4, capacity=3)
    assert np.array_equal(back.traces, lib.traces) and np.array_equal(back.weights, lib.weights)
    assert len(TraceLibrary.load(tmp_path / "missing.npz", 2, 4)) == 0
    (tmp_path / "bad.npz").write_bytes(b"junk")
    assert len(TraceLibrary.load(tmp_path / "bad.npz", 2, 4)) == 0


def test_trace_prediction_picks_the_matching_trace():
    lib = TraceLibrary(3, 4, merge_threshold=0.999)
    math_like = np.array([[9, 1, 0, 0], [0, 9, 1, 0], [0, 0, 9, 1]])
    text_like = np.array([[0, 0, 1, 9], [1, 0, 0, 9], [9, 0, 1, 0]])
    lib.add(math_like)
    lib.add(text_like)
    partial = np.zeros((3, 4))
    partial[0] = [0, 0, 1, 8]  # first layer looks like text
    pred = lib.predict(partial, np.array([True, False, False]), top=1)
    assert pred[2].argmax() == 0 and pred[1].argmax() == 3


class _CountingSource:
    """Wraps a source and counts its reads per expert (the "disk" reads)."""

    def __init__(self, inner):
        self.inner, self.layout, self.reads = inner, inner.layout, []

    def read_into(self, layer, expert, out):
        self.reads.append((layer, expert))
        self.inner.read_into(layer, expert, out)


def test_host_tier_serves_device_misses_without_reading_the_source(source):
    counting = _CountingSource(source)
    store = ExpertStore(counting, num_slots=2, policy=LRUPolicy(), threads=2, host_slots=5)
    try:
        for _ in range(3):  # cycle 4 experts through 2 device slots: each round evicts all of them
            for e in range(4):
                got = store.acquire(1, [e])
                assert torch.equal(got[e][0], source.gate_up[1][e]) and torch.equal(got[e][1], source.down[1][e])
                store.release(1)
        assert sorted(counting.reads) == [(1, e) for e in range(4)]  # read once each, then from the host tier
        s = store.stats.as_dict()
        assert s["misses"] == 12 and s["host_hits"] == 8
        assert s["bytes_disk_to_host"] == 4 * store.layout.nbytes
        assert s["bytes_host_to_device"] == 12 * store.layout.nbytes
        for e in range(4, 6):  # two more experts: the host tier (5 slots) evicts its least recent one
            store.acquire(1, [e])
            store.release(1)
        assert store.host.holds((1, 5)) and not store.host.holds((1, 0))
        assert len(store.host._slot_of) <= store.host.num_slots == 5
        assert store.host.nbytes == 5 * store.slot_bytes
    finally:
        store.close()


def test_host_tier_read_error_frees_its_slot(source):
    store = ExpertStore(source, num_slots=2, policy=LRUPolicy(), threads=2, host_slots=2)
    real = source.read_into
    source.read_into = lambda layer, expert, out: (_ for _ in ()).throw(OSError("bad sector"))
    try:
        with pytest.raises(OSError, match="bad sector"):
            store.acquire(0, [1])
        source.read_into = real
        for e in range(3):  # both host slots are usable again
            assert torch.equal(store.acquire(0, [e])[e][0], source.gate_up[0][e])
            store.release(0)
    finally:
        store.close()


def test_host_tier_needs_a_slot_per_loader(source):
    with pytest.raises(ValueError, match="at least 4 slots"):
        ExpertStore(source, num_slots=2, policy=LRUPolicy(), threads=4, host_slots=2)
