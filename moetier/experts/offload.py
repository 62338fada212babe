"""Offloaded experts: the ``Experts`` that fetch weights from the store, and the
per-step bookkeeping (activation traces, prefetch) around them."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..models.moe import ExpertsBase
from .prefetch import Prefetcher
from .store import ExpertStore

log = logging.getLogger(__name__)


class ExpertTracer:
    """Per-request activation counts ``[moe_layers, experts]`` for the sequences of a step."""

    def __init__(self, num_layers: int, num_experts: int):
        self.shape = (num_layers, num_experts)
        self.counts: dict[object, np.ndarray] = {}
        self._step: list[tuple[object, int, int]] = []  # (sequence key, token start, token end)

    def begin_step(self, keys: list[object], lengths: list[int]) -> None:
        self._step, start = [], 0
        for k, n in zip(keys, lengths):
            self.counts.setdefault(k, np.zeros(self.shape, dtype=np.float32))
            self._step.append((k, start, start + n))
            start += n

    def record(self, layer: int, ids: torch.Tensor) -> None:
        """ids ``[T, k]`` of the step's tokens at MoE layer ``layer``."""
        flat = ids.detach().cpu().numpy()
        for k, a, b in self._step:
            np.add.at(self.counts[k][layer], flat[a:b].ravel(), 1)

    def running(self) -> list[np.ndarray]:
        return [self.counts[k] for k, _, _ in self._step]

    def pop(self, key: object) -> Optional[np.ndarray]:
        return self.counts.pop(key, None)


class OffloadedExperts(ExpertsBase):
    """A layer's routed experts held by the :class:`ExpertStore` instead of as parameters."""

    def __init__(self, runtime: "OffloadRuntime", layer: int, num_experts: int):
        super().__init__()
        self.runtime = runtime
        self.layer = layer  # MoE-layer ordinal, not the decoder layer index
        self.num_experts = num_experts
        self._weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._weights[e]

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        rt = self.runtime
        rt.tracer.record(self.layer, ids)
        # demand first: this layer's misses must not queue behind speculative loads on the reader
        # pool, and until acquire() pins this layer's experts a prefetch could evict them (the
        # activation policy ranks the running layer's experts as the farthest from reuse)
        self._weights = rt.store.acquire(self.layer, torch.unique(ids).tolist())
        rt.prefetcher.on_layer(self.layer, x)
        try:
            return super().forward(x, ids, weights)
        finally:
            self._weights = {}
            rt.store.release(self.layer)


class OffloadRuntime:
    """Ties store, tracer, trace library and prefetcher to the engine's steps."""

    def __init__(self, store: ExpertStore, prefetcher: Prefetcher, tracer: ExpertTracer,
                 library_path: Optional[Path] = None):
        self.store = store
        self.prefetcher = prefetcher
        self.tracer = tracer
        self.library = prefetcher.library
        self.library_path = library_path
        self._saved = time.monotonic()

    # engine hooks
    def begin_step(self, keys: list[object], lengths: list[int]) -> None:
        self.tracer.begin_step(keys, lengths)
        self.prefetcher.begin_step(self.tracer.running())

    def end_step(self) -> None:
        self.store.end_step()

    def finish(self, key: object) -> None:
        """A sequence finished: its trace joins the library (saved when the library has a path)."""
        counts = self.tracer.pop(key)
        if counts is not None and counts.any():
            self.library.add(counts)
            now = time.monotonic()
            if self.library_path is not None and now - self._saved > 10:  # and at close()
                self._save_library()
                self._saved = now

    def _save_library(self) -> None:
        """Save the library; a failure (a full disk) is a warning: it only guides prefetching."""
        try:
            self.library.save(self.library_path)
        except OSError as e:
            log.warning("could not save the trace library to %s: %s", self.library_path, e)

    def stats(self) -> dict:
        return self.store.stats.as_dict()

    def close(self) -> None:
        self.store.close()
        if self.library_path is not None and len(self.library):
            self._save_library()
