"""The server's models: each registered model loads on its first request; the least recently used
idle ones are evicted when the next would exceed the memory budget."""

from __future__ import annotations

import gc
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..units import fmt_size
from .protocol import APIError
from .worker import EngineWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """What a loaded model had at one moment (see :meth:`ModelPool.loaded`)."""

    name: str
    llm: object
    worker: EngineWorker
    footprint: int


@dataclass
class Entry:
    """One registered model; ``llm`` and ``worker`` are set while it is loaded."""

    name: str
    path: str
    llm: object = None
    worker: Optional[EngineWorker] = None
    footprint: int = 0  # bytes it holds on the device once loaded (measured after the load)
    users: int = 0  # requests holding it; an entry in use is never evicted
    last_used: float = 0.0
    keep_until: Optional[float] = None  # monotonic time after which an idle entry unloads (None: never)

    @property
    def loaded(self) -> bool:
        return self.llm is not None


def weights_on_disk(path: str) -> int:
    """Bytes of a checkpoint folder's weight files: the size estimate used before a model is loaded."""
    from ..llm import resolve_model_path

    folder = resolve_model_path(path)
    return sum(f.stat().st_size for pat in ("*.safetensors", "weights-*.bin") for f in Path(folder).glob(pat))


class ModelPool:
    """Loads models on demand within ``budget`` bytes (None: no limit, nothing is evicted).

    A model that fits the budget loads fully resident; one bigger than the whole budget
    loads offloaded with the whole budget as its ``device_memory`` (every other model is
    evicted first). ``load(id, path, device_memory)`` makes an ``LLM``; the CLI passes one
    that carries the user's other options. ``split`` (id -> device_memory, None for resident) fixes
    how some models load instead: a served cascade's memory plan (``moetier/cascade_memory.py``).
    """

    def __init__(self, models: dict[str, str], load: Callable[[str, str, Optional[int]], object],
                 budget: Optional[int] = None):
        if not models:
            raise ValueError("the server needs at least one model")
        self.entries = {name: Entry(name, path) for name, path in models.items()}
        self.budget = budget
        self.split: dict[str, Optional[int]] = {}
        self._load = load
        self._lock = threading.Lock()  # guards entry state; held only briefly
        self._loading = threading.Lock()  # one load (and its evictions) at a time

    def names(self) -> list[str]:
        return list(self.entries)

    def loaded(self) -> list[Loaded]:
        """The loaded models now: a snapshot, safe to read while another thread evicts one."""
        with self._lock:
            return [Loaded(e.name, e.llm, e.worker, e.footprint) for e in self.entries.values() if e.loaded]

    @contextmanager
    def use(self, name: str) -> Iterator[Entry]:
        """The loaded entry for ``name``, loading it (and evicting others) if needed; held until exit."""
        entry = self.entries[name]
        if not self._acquire(entry):
            with self._loading:  # evictions happen only under this lock, so the model stays loaded
                if not self._acquire(entry):
                    self._load_entry(entry)
                    self._acquire(entry)
        try:
            yield entry
        finally:
            with self._lock:
                entry.users -= 1
                entry.last_used = time.monotonic()

    def load(self, name: str) -> None:
        """Load ``name`` now (``POST /v1/models/{id}/load``)."""
        with self.use(name):
            pass

    def unload(self, name: str) -> bool:
        """Unload ``name`` if it is loaded and idle; False if requests hold it (it stays loaded)."""
        entry = self.entries[name]
        with self._lock:
            if not entry.loaded:
                return True
            if entry.users:
                return False
            held = _detach(entry)
        log.info("unloading %s", name)
        _release(*held)
        return True

    def keep_alive(self, name: str, seconds: Optional[float]) -> None:
        """After its last request, keep ``name`` loaded ``seconds`` more (None or negative: forever)."""
        with self._lock:
            e = self.entries[name]
            e.keep_until = None if seconds is None or seconds < 0 else time.monotonic() + seconds

    def reap(self) -> list[str]:
        """Unload the idle models whose keep_alive has run out; returns their names."""
        now = time.monotonic()
        with self._lock:
            due = [e.name for e in self.entries.values()
                   if e.loaded and e.users == 0 and e.keep_until is not None and e.keep_until <= now]
        return [n for n in due if self.unload(n)]

    def close(self) -> None:
        for e in self.entries.values():
            with self._lock:
                held = _detach(e)
            _release(*held, wait=10.0)

    # -- internals ---------------------------------------------------------------------------------

    def _acquire(self, entry: Entry) -> bool:
        with self._lock:
            if not entry.loaded:
                return False
            entry.users += 1
            entry.last_used = time.monotonic()
            return True

    def _load_entry(self, entry: Entry) -> None:
        """Make room, load, start its worker; the caller holds ``_loading``."""
        want = weights_on_disk(entry.path)
        if entry.name in self.split:  # the cascade's plan says resident or offloaded, and within what
            device_memory = self.split[entry.name]
            offload, why = device_memory is not None, " (offloaded: the cascade's memory plan)"
        else:
            offload, why = self.budget is not None and want > self.budget, " (offloaded: bigger than the budget)"
            device_memory = self.budget if offload else None
        self._make_room(entry, device_memory if offload else want)
        log.info("loading %s from %s%s", entry.name, entry.path, why if offload else "")
        t0 = time.perf_counter()
        try:
            llm = self._load(entry.name, entry.path, device_memory)
        except Exception as e:
            log.exception("loading %s failed", entry.name)
            raise APIError(500, f"could not load the model {entry.name!r}: {e}", type="server_error",
                           code="model_load_failed") from None
        worker = EngineWorker(llm).start()
        with self._lock:
            entry.llm, entry.worker, entry.footprint = llm, worker, llm.footprint()
            entry.last_used = time.monotonic()
        log.info("loaded %s (%s%s) in %.1f s", entry.name, fmt_size(entry.footprint),
                 ", offloaded" if offload else "", time.perf_counter() - t0)
        # the estimate from file sizes can be short of what the loaded model holds (KV reserve)
        self._make_room(entry, 0, strict=False)

    def _make_room(self, entry: Entry, need: int, strict: bool = True) -> None:
        """Evict idle models, least recently used first, until ``need`` more bytes fit the budget.

        When only busy models are left: ``strict`` raises 503, otherwise it goes on over budget.
        """
        if self.budget is None:
            return
        while True:
            with self._lock:
                others = [e for e in self.entries.values() if e.loaded and e is not entry]
                held = sum(e.footprint for e in others) + (entry.footprint if entry.loaded else 0)
                if held + need <= self.budget:
                    return
                idle = sorted((e for e in others if e.users == 0), key=lambda e: e.last_used)
                if not idle:
                    if not strict or not others:
                        log.warning("%s: %s held, over the budget of %s", entry.name, fmt_size(held + need),
                                    fmt_size(self.budget))
                        return
                    busy = ", ".join(e.name for e in others)
                    raise APIError(503, f"the model {entry.name!r} needs {fmt_size(need)} more and the budget "
                                        f"of {fmt_size(self.budget)} is held by models serving requests "
                                        f"({busy}); retry shortly", type="server_error", code="model_busy")
                victim = _detach(idle[0])  # under the lock, so no request can take it meanwhile
            log.info("evicting %s to make room for %s", idle[0].name, entry.name)
            _release(*victim)


def _detach(entry: Entry) -> tuple:
    """Mark ``entry`` unloaded; returns its LLM and worker for :func:`_release`. Caller holds the lock."""
    held = entry.llm, entry.worker
    entry.llm, entry.worker, entry.footprint = None, None, 0
    return held


def _release(llm, worker: Optional[EngineWorker], wait: Optional[float] = None) -> None:
    """Stop the worker (waiting up to ``wait`` s for its step to end; None: as long as it takes)
    and free the model's memory now, before the next model loads. Errors are logged, not raised:
    the model is already out of the pool."""
    try:
        if worker is not None:
            worker.stop(wait)
        if llm is None:
            return
        device = llm.engine.device
        llm.close()
    except Exception:
        log.exception("releasing a model failed")
        return
    del llm, worker
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
