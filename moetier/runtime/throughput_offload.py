"""How the throughput runner uses the shared expert store: a layer-scan access pattern.

A throughput pass runs every MoE layer once, in order, on hundreds of tokens, so
nearly every expert of a layer is needed and the layers come round again next
pass. The latency runner's machinery (per-request traces, trace-matching
prefetch, activation-aware eviction) is built for sparse, request-specific use;
for a scan the right choices are simple and different:

- prefetch: while layer ``l`` computes, load the experts layer ``l+1`` will need
  (its router applied to layer ``l``'s input; for the wrap to layer 0, the
  experts layer 0 used last pass), experts already resident first so that they
  are protected before any load could evict them;
- eviction: Belady's rule for a cyclic scan — evict the expert whose layer runs
  again furthest in the future — so ``slots - 2 x experts-per-layer`` experts
  stay resident across passes and the rest are read once per pass;
- traces: none per request; only which experts each layer used last pass.

:func:`scan_offload` installs these on the shared :class:`OffloadRuntime` (and
sizes the store's pool as planned) for the duration of a run, then puts the
latency runner's back. The store, its source and the model are unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from ..experts.cache import Key, Policy


class ScanPolicy(Policy):
    """Evict the expert whose layer runs again furthest in the future (Belady for a layer cycle)."""

    name = "scan"

    def __init__(self, num_layers: int):
        self.num_layers = num_layers

    def victim(self, candidates, layer: int) -> Key:
        # layers until k's layer runs (again), the layer running now being next: during a
        # prefetch its experts may not be acquired yet
        return max(candidates, key=lambda k: (k[0] - layer) % self.num_layers)


class ScanTracer:
    """The tracer interface with no per-request traces: remembers each layer's expert use last pass."""

    def __init__(self, num_layers: int, num_experts: int):
        self.num_experts = num_experts
        self.last: list[Optional[torch.Tensor]] = [None] * num_layers  # [E] token counts per layer

    def begin_step(self, keys, lengths) -> None:
        pass

    def record(self, layer: int, ids: torch.Tensor) -> None:
        self.last[layer] = torch.bincount(ids.reshape(-1), minlength=self.num_experts).cpu()

    def running(self) -> list:
        return []

    def pop(self, key) -> None:
        return None


class ScanPrefetcher:
    """At each MoE layer, start loading the experts the next layer will need (most tokens first)."""

    def __init__(self, store, routers: list[torch.nn.Module], tracer: ScanTracer):
        self.store = store
        self.routers = routers
        self.tracer = tracer
        self.num_layers = len(routers)
        self.num_experts = tracer.num_experts

    def begin_step(self, counts) -> None:
        pass

    @torch.inference_mode()
    def on_layer(self, layer: int, x: torch.Tensor) -> None:
        """``x`` ``[T, H]``: MoE layer ``layer``'s input, a proxy for the next layer's."""
        nxt = layer + 1
        if nxt < self.num_layers:
            _, ids = self.routers[nxt](x)  # [T, k]
            counts = torch.bincount(ids.reshape(-1), minlength=self.num_experts).cpu()
        else:  # layer 0 of the next pass sees new tokens: expect what it used this pass
            nxt, counts = 0, self.tracer.last[0]
            if counts is None:
                return
        order = torch.argsort(counts, descending=True, stable=True).tolist()
        wanted = [(nxt, e) for e in order if counts[e] > 0]
        resident = self.store.resident()
        have = [k for k in wanted if k in resident]
        # a whole layer's worth of slots stays for the layer running now (its experts may not be
        # acquired yet): loading the next layer into them would read them twice per pass
        room = max(0, self.store.num_slots - self.num_experts - len(have))
        self.store.prefetch(have + [k for k in wanted if k not in resident][:room], layer)


@contextmanager
def scan_offload(offload, num_slots: Optional[int] = None) -> Iterator[object]:
    """Serve the runner's passes from ``offload``'s store with scan prefetch and eviction.

    ``num_slots``: resize the store's pool for the run (the planner's split of the memory
    budget between expert slots and KV cache); the old size is restored afterwards.
    Yields the step hooks to give :func:`~moetier.runtime.step.forward_step`.
    """
    store = offload.store
    saved = (offload.tracer, offload.prefetcher, store.policy, store.num_slots)
    layers, experts = offload.tracer.shape
    tracer = ScanTracer(layers, experts)
    if num_slots is not None and num_slots != store.num_slots:
        store.resize(num_slots)
    store.policy = ScanPolicy(layers)
    offload.tracer = tracer
    offload.prefetcher = ScanPrefetcher(store, saved[1].routers, tracer)
    try:
        yield offload
    finally:
        offload.tracer, offload.prefetcher, store.policy = saved[0], saved[1], saved[2]
        if store.num_slots != saved[3]:
            store.resize(saved[3])
