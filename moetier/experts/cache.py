"""Replacement policies for expert slots.

A key is ``(layer, expert)``. The store tells the policy about every use
(``touch``) and asks it to pick a victim among the slots it may evict (those
not in use by the running layer and not protected by a prefetch).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Optional

import numpy as np

Key = tuple[int, int]


class Policy:
    """Base class: subclasses rank candidates; lower rank is evicted first."""

    name = "base"

    def touch(self, key: Key) -> None:
        """``key`` was used by a forward pass."""

    def forget(self, key: Key) -> None:
        """``key`` left the cache."""

    def victim(self, candidates: Iterable[Key], layer: int) -> Key:
        """The candidate to evict; ``layer`` is the layer running now."""
        raise NotImplementedError


class LRUPolicy(Policy):
    """Evict the expert used longest ago."""

    name = "lru"

    def __init__(self):
        self._order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def forget(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, candidates: Iterable[Key], layer: int) -> Key:
        cands = list(candidates)
        for key in cands:  # loaded (a prefetch) and never used since: the least recently used of all
            if key not in self._order:
                return key
        cands = set(cands)
        for key in self._order:
            if key in cands:
                return key
        return next(iter(cands))


class LFUPolicy(Policy):
    """Evict the expert used least often (ties: least recently)."""

    name = "lfu"

    def __init__(self):
        self._count: dict[Key, int] = {}
        self._last: dict[Key, int] = {}
        self._clock = 0

    def touch(self, key: Key) -> None:
        self._clock += 1
        self._count[key] = self._count.get(key, 0) + 1
        self._last[key] = self._clock

    def victim(self, candidates: Iterable[Key], layer: int) -> Key:
        return min(candidates, key=lambda k: (self._count.get(k, 0), self._last.get(k, 0)))


class ActivationPolicy(LFUPolicy):
    """Activation-aware eviction (after MoE-Infinity).

    Keeps the experts the running requests are predicted to use next. The
    prediction ``[layers, experts]`` (a probability per expert, from the trace
    library and the requests' own activations so far) is set by the prefetcher
    each step; an expert's priority is its predicted probability, discounted by
    how many layers away its next use is, with the long-run frequency breaking
    ties. Without a prediction it behaves like LFU.
    """

    name = "activation"

    def __init__(self, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        self.predicted: Optional[np.ndarray] = None

    def set_prediction(self, predicted: Optional[np.ndarray]) -> None:
        self.predicted = predicted

    def victim(self, candidates: Iterable[Key], layer: int) -> Key:
        if self.predicted is None:
            return super().victim(candidates, layer)
        total = max(self._clock, 1)

        def priority(k: Key) -> tuple[float, float]:
            distance = (k[0] - layer - 1) % self.num_layers + 1  # layers until k's layer runs again
            p = float(self.predicted[k[0], k[1]]) / distance
            return p, self._count.get(k, 0) / total

        return min(candidates, key=priority)


POLICIES = ("lru", "lfu", "activation")


def make_policy(name: str, num_layers: int) -> Policy:
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "activation":
        return ActivationPolicy(num_layers)
    raise ValueError(f"unknown cache policy {name!r}; choose one of: {', '.join(POLICIES)}")
