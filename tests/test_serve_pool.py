"""The server's model pool on its own: LRU eviction within the budget, busy models kept, failures contained.

The models are stand-ins (the pool only needs a footprint, an engine for its worker thread,
and close); the real load-and-serve path is tested live in test_serve_models.py.
"""

import threading
import types

import pytest

from moetier.serve.pool import ModelPool
from moetier.serve.protocol import APIError


class _Model:
    def __init__(self, size: int, fail_close: bool = False):
        self.size, self.fail_close, self.closed = size, fail_close, False
        self.engine = types.SimpleNamespace(has_unfinished=lambda: False, device=types.SimpleNamespace(type="cpu"))

    def footprint(self) -> int:
        return self.size

    def close(self) -> None:
        self.closed = True
        if self.fail_close:
            raise OSError("cannot save the trace library")


@pytest.fixture
def folders(tmp_path):
    paths = {}
    for name in "abc":
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"\0" * 1000)  # what the pool estimates from
        paths[name] = str(tmp_path / name)
    return paths


def _pool(folders, budget, **models):
    made = {}

    def load(name, path, device_memory):
        made[name] = models.get(name) or _Model(1000)
        made[name].device_memory = device_memory
        return made[name]

    return ModelPool(folders, load, budget), made


def _loaded(pool):
    return sorted(m.name for m in pool.loaded())


def test_least_recently_used_idle_model_is_evicted(folders):
    pool, made = _pool(folders, budget=2500)
    for name in ("a", "b", "a"):
        with pool.use(name):
            pass
    with pool.use("c"):
        assert _loaded(pool) == ["a", "c"]  # b was used least recently
    assert made["b"].closed and not made["a"].closed
    pool.close()
    assert made["a"].closed and made["c"].closed


def test_busy_model_is_kept_and_the_request_gets_503(folders):
    pool, _ = _pool(folders, budget=1500)
    with pool.use("a"):
        with pytest.raises(APIError) as e:
            with pool.use("b"):
                pass
        assert e.value.status == 503 and e.value.code == "model_busy" and "(a)" in e.value.message
        assert _loaded(pool) == ["a"]
    with pool.use("b"):  # a is idle now
        assert _loaded(pool) == ["b"]
    pool.close()


def test_model_bigger_than_the_budget_loads_offloaded_with_all_of_it(folders):
    pool, made = _pool(folders, budget=900)
    with pool.use("a"):
        assert made["a"].device_memory == 900
    with pool.use("b"):
        assert _loaded(pool) == ["b"]
    pool.close()


def test_a_failing_close_does_not_leak_the_new_model(folders):
    pool, made = _pool(folders, budget=1500, a=_Model(1000, fail_close=True))
    with pool.use("a"):
        pass
    with pool.use("b"):  # evicting a raises inside close(): logged, b still loads and serves
        pass
    assert made["a"].closed
    with pool.use("c"):  # b was released properly, so it can be evicted in turn
        assert _loaded(pool) == ["c"]
    assert pool.entries["b"].users == 0 and pool.entries["c"].users == 0
    pool.close()


def test_concurrent_first_requests_load_once(folders):
    pool, made = _pool(folders, budget=None)
    loads = []
    original = pool._load
    pool._load = lambda *a: loads.append(a[0]) or original(*a)
    held = [pool.use("a") for _ in range(8)]  # one request each, all arriving before "a" is loaded
    threads = [threading.Thread(target=cm.__enter__) for cm in held]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == ["a"] and pool.entries["a"].users == 8
    for cm in held:
        cm.__exit__(None, None, None)
    assert pool.entries["a"].users == 0
    pool.close()


def test_a_fixed_split_decides_how_each_model_loads(folders):
    """A served cascade's memory plan: one model resident, one offloaded within its share, whatever the pool's
    own rule (both fit the budget here, so without the split both would load resident)."""
    pool, made = _pool(folders, budget=2500)
    pool.split = {"a": None, "b": 700}
    for name in ("a", "b", "c"):
        with pool.use(name):
            pass
    assert (made["a"].device_memory, made["b"].device_memory, made["c"].device_memory) == (None, 700, None)


def test_served_cascade_memory_split():
    from moetier.cascade_cli import serve_cascades, serve_memory_split

    models: dict = {}
    cascades = serve_cascades(["c=demo-small,demo"], models)
    assert serve_memory_split(cascades, models, None) is None  # no budget: the pool's own rule
    roomy = serve_memory_split(cascades, models, 64 << 20)
    assert roomy.names == ["demo-small", "demo"] and roomy.device_memory == [None, None]
    tight = serve_memory_split(cascades, models, 10 << 20)  # demo (14 MB of weights) does not fit resident
    assert tight.device_memory[0] is None and 0 < tight.device_memory[1] <= (10 << 20)
    assert serve_memory_split(cascades, {**models, "other": "demo"}, 64 << 20) is None  # shared with a model
