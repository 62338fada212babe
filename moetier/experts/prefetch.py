"""Predict which experts the coming layers will need, and ask the store for them early.

Two predictors, measured against each other by ``bench/latency.py``:

- trace matching: the running requests' activation counts so far are matched
  against the trace library (MoE-Infinity); their own counts are blended in,
  so a request with no close match still predicts from its own history;
- router look-ahead: the next layer's router applied to this layer's MoE input.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .cache import ActivationPolicy, Key
from .store import ExpertStore
from .trace import TraceLibrary, normalize


class Prefetcher:
    """Per step: predicted expert distribution per MoE layer; per layer: prefetch the next ones.

    ``window``: how many MoE layers ahead to prefetch; ``mass``: prefetch the
    most likely experts of a layer until their predicted probability sums to
    this, at most ``max_per_layer`` of them (default: ``top_k`` per running sequence, as many as
    the step can use; more only evicts experts that are needed, to read ones that are not).
    """

    def __init__(self, store: ExpertStore, library: TraceLibrary, routers: list[torch.nn.Module],
                 top_k: int, mode: str = "trace", window: int = 2, mass: float = 0.9,
                 max_per_layer: Optional[int] = None):
        if mode not in ("trace", "lookahead", "none"):
            raise ValueError(f"unknown prefetch mode {mode!r}; choose trace, lookahead or none")
        self.store = store
        self.library = library
        self.routers = routers
        self.mode = mode
        self.window = window
        self.mass = mass
        self.top_k = top_k
        self.max_per_layer = max_per_layer  # None: what the step can use, top_k per running sequence
        self._cap = max_per_layer or top_k
        self.num_layers = len(routers)
        self.predicted: Optional[np.ndarray] = None  # [layers, experts] for this step

    def begin_step(self, counts: list[np.ndarray]) -> None:
        """Predict this step's experts from each running request's counts ``[layers, experts]``."""
        if not counts:
            self.predicted = None
            return
        self._cap = self.max_per_layer or self.top_k * len(counts)
        preds = []
        for c in counts:
            own = normalize(c)
            seen = c.sum(axis=1) > 0
            match = self.library.predict(c, seen)
            preds.append(own if match is None else 0.5 * own + 0.5 * match)
        self.predicted = np.mean(preds, axis=0)
        if isinstance(self.store.policy, ActivationPolicy):
            self.store.policy.set_prediction(self.predicted)

    def on_layer(self, layer: int, x: torch.Tensor) -> None:
        """Called when MoE layer ``layer`` is about to run on input ``x`` ``[T, H]``."""
        if self.mode == "none":
            return
        keys: list[Key] = []
        for ahead in range(1, self.window + 1):
            nxt = (layer + ahead) % self.num_layers
            if self.mode == "lookahead":
                experts = self._lookahead(nxt, x) if ahead == 1 else []
            else:
                experts = self._from_prediction(nxt)
            keys.extend((nxt, e) for e in experts)
        if keys:
            self.store.prefetch(keys, layer)

    def _from_prediction(self, layer: int) -> list[int]:
        if self.predicted is None:
            return []
        p = self.predicted[layer]
        order = np.argsort(-p)
        picked, total = [], 0.0
        for e in order[: self._cap]:
            if p[e] <= 0 or total >= self.mass:
                break
            picked.append(int(e))
            total += float(p[e])
        return picked

    @torch.inference_mode()
    def _lookahead(self, layer: int, x: torch.Tensor) -> list[int]:
        _, ids = self.routers[layer](x)
        return torch.unique(ids).tolist()
