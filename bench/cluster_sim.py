"""Discrete-event simulation of model placement over a fleet: locality-aware vs random vs least-loaded.

The question ServerlessLLM asks of a serving cluster: when a request finds no replica of its model
with room, where should the new replica go? A replica's startup time is the checkpoint's size over
the rate of the tier it is read from on that node: the page cache (``--cache-gbps``), the local disk
in the packed format (``--disk-gbps``), or the network (``--network-gbps``: the node fetches it, then
it is on its disk too). Each node's page cache and disk keep the checkpoints read last (LRU).

Policies, for a model with no replica free:

- ``locality``: the node with the least estimated startup among those with room (idle replicas
  evicted to make room count as room); failing that, or when a faster node is full of running
  replicas, **live migration**: move one running replica of another model off that node to a node
  with room (its requests move once the destination has loaded it, as in ServerlessLLM: prompt and
  generated tokens re-prefilled there, ``--handoff-s``), then load this model where it is fastest.
  Counted in ``migrations``.
- ``random``: a random node with room.
- ``least_loaded``: the node with the most free accelerator memory.

Without room anywhere a request waits for room (counted in its startup latency). Arrivals are
Poisson per model (model popularity Zipf) or bursty (each model switches between on and off
periods, the same mean rate). Output: JSON, one object per (arrivals, policy) with startup latency
p50 / p99 / mean over requests (0 for a request that found a replica with room) and over those
that waited, cold starts by tier, migrations; ``--plot FILE`` draws p50 / p99 per policy.

  python bench/cluster_sim.py --cache-gbps 6 --disk-gbps 1.5 --network-gbps 1.25 --plot sim.png

The rates default to ``--rates FILE`` (the JSON of bench/load.py: the packed loader warm and cold),
else the figures measured on the development machine (see docs), and the network rate is stated.
The startup estimate and the rates are those ``moetier serve --ray`` places replicas by
(moetier/cluster/placement.py).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import statistics
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
from moetier.cluster.placement import TIERS, Rates  # noqa: E402


@dataclass
class Fleet:
    nodes: int = 64
    gpu_gb: float = 640.0  # accelerator memory a node gives its replicas (8 x 80 GB; --gpu-gb)
    cache_gb: float = 1024.0  # page cache (host RAM) per node
    disk_gb: float = 4000.0  # local NVMe per node
    copies: int = 2  # nodes whose disk holds each checkpoint at the start
    cache_gbps: float = 6.0
    disk_gbps: float = 1.5
    network_gbps: float = 1.25
    start_s: float = 2.0  # process start and engine set-up, any tier
    handoff_s: float = 0.5  # a migrated replica's requests re-prefilled on the destination
    concurrency: int = 8  # requests a replica serves at once
    keep_alive_s: float = 120.0  # an idle replica is unloaded after this long


@dataclass
class Replica:
    model: int
    node: int
    ready_at: float
    running: int = 0
    idle_since: float = 0.0
    gone: bool = False
    queue: list = field(default_factory=list)  # arrival times waiting for it to load


class LRU:
    def __init__(self, cap: float):
        self.cap, self.items = cap, OrderedDict()

    def has(self, m: int) -> bool:
        if m in self.items:
            self.items.move_to_end(m)
            return True
        return False

    def add(self, m: int, size: float) -> None:
        self.items[m] = size
        self.items.move_to_end(m)
        while sum(self.items.values()) > self.cap and len(self.items) > 1:
            self.items.popitem(last=False)


class Sim:
    def __init__(self, fleet: Fleet, sizes: list[float], policy: str, seed: int):
        self.f, self.sizes, self.policy = fleet, sizes, policy
        self.rates = Rates(fleet.cache_gbps, fleet.disk_gbps, fleet.network_gbps, fleet.start_s)
        self.rng = random.Random(seed)
        self.cache = [LRU(fleet.cache_gb) for _ in range(fleet.nodes)]
        self.disk = [LRU(fleet.disk_gb) for _ in range(fleet.nodes)]
        for m, s in enumerate(sizes):  # each checkpoint starts on `copies` nodes' disks
            for n in self.rng.sample(range(fleet.nodes), fleet.copies):
                self.disk[n].add(m, s)
        self.replicas: list[list[Replica]] = [[] for _ in range(fleet.nodes)]
        self.by_model: dict[int, list[Replica]] = {m: [] for m in range(len(sizes))}
        self.events: list = []
        self.seq = itertools.count()
        self.waiting: list = []  # (arrival, model): no room anywhere
        self.latency: list[float] = []
        self.cold = {t: 0 for t in TIERS}
        self.migrations = 0

    # -- the fleet's state -------------------------------------------------------------------------------

    def used(self, n: int) -> float:
        return sum(self.sizes[r.model] for r in self.replicas[n])

    def idle_gb(self, n: int) -> float:
        return sum(self.sizes[r.model] for r in self.replicas[n] if r.running == 0 and not r.queue)

    def room(self, n: int, gb: float) -> bool:
        return self.f.gpu_gb - self.used(n) + self.idle_gb(n) >= gb

    def tier(self, n: int, m: int) -> str:
        return "cache" if m in self.cache[n].items else "disk" if m in self.disk[n].items else "remote"

    def load_s(self, n: int, m: int) -> float:
        return self.rates.startup_s({self.tier(n, m): self.sizes[m]})

    # -- placement -----------------------------------------------------------------------------------

    def place(self, m: int, now: float) -> bool:
        """Start a replica of m somewhere (True), or find no room (False)."""
        gb = self.sizes[m]
        free = [self.f.gpu_gb - self.used(n) + self.idle_gb(n) for n in range(self.f.nodes)]  # idle evictable
        fits = [n for n in range(self.f.nodes) if free[n] >= gb]
        if self.policy == "random":
            if not fits:
                return False
            return self._start(self.rng.choice(fits), m, now, 0.0)
        if self.policy == "least_loaded":
            if not fits:
                return False
            return self._start(max(fits, key=lambda n: (self.f.gpu_gb - self.used(n), -n)), m, now, 0.0)
        best = min(((self.load_s(n, m), n) for n in fits), default=(math.inf, None))
        move = self._migration(m, best[0], free)
        if move is not None and move[0] < best[0]:
            _, n, victim, dest = move
            self._migrate(victim, dest, now)
            return self._start(n, m, now, self.load_s(dest, victim.model) + self.f.handoff_s)
        if best[1] is None:
            return False
        return self._start(best[1], m, now, 0.0)

    def _migration(self, m: int, beat: float, free: list[float]):
        """(estimate, node, replica to move, its destination) of the best migration that beats ``beat``."""
        gb, found = self.sizes[m], None
        for n in range(self.f.nodes):
            fast = self.load_s(n, m)
            if fast + self.f.handoff_s >= beat or free[n] >= gb:
                continue
            for r in self.replicas[n]:
                if r.running == 0 or r.queue or free[n] + self.sizes[r.model] < gb:
                    continue
                dests = [d for d in range(self.f.nodes) if d != n and free[d] >= self.sizes[r.model]]
                if not dests:
                    continue
                d = min(dests, key=lambda d: self.load_s(d, r.model))
                est = self.load_s(d, r.model) + self.f.handoff_s + fast
                if est < beat and (found is None or est < found[0]):
                    found = (est, n, r, d)
        return found

    def _evict_idle(self, n: int, gb: float, now: float) -> None:
        for r in sorted(self.replicas[n], key=lambda r: r.idle_since):
            if self.f.gpu_gb - self.used(n) >= gb:
                return
            if r.running == 0 and not r.queue:
                self._drop(r)

    def _drop(self, r: Replica) -> None:
        r.gone = True
        self.replicas[r.node].remove(r)
        self.by_model[r.model].remove(r)

    def _start(self, n: int, m: int, now: float, delay: float) -> bool:
        self._evict_idle(n, self.sizes[m], now)
        t = self.tier(n, m)
        self.cold[t] += 1
        ready = now + delay + self.load_s(n, m)
        r = Replica(m, n, ready)
        self.replicas[n].append(r)
        self.by_model[m].append(r)
        self.cache[n].add(m, self.sizes[m])
        self.disk[n].add(m, self.sizes[m])
        self.push(ready, "ready", r)
        return True

    def _migrate(self, victim: Replica, dest: int, now: float) -> None:
        """Move victim to dest. Its requests run on where they are until dest has loaded the model, then
        are handed off (re-prefilled there); the source's memory is promised to the new model, whose
        load :meth:`place` delays by that much. The replica is counted on dest from now."""
        self.migrations += 1
        self._evict_idle(dest, self.sizes[victim.model], now)
        self.cache[dest].add(victim.model, self.sizes[victim.model])
        self.disk[dest].add(victim.model, self.sizes[victim.model])
        self.replicas[victim.node].remove(victim)
        self.replicas[dest].append(victim)
        victim.node = dest

    # -- events --------------------------------------------------------------------------------------

    def push(self, t: float, kind: str, obj) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, obj))

    def arrive(self, now: float, m: int, service: float, arrived: float | None = None) -> None:
        arrived = now if arrived is None else arrived
        for r in self.by_model[m]:
            if r.ready_at <= now and r.running < self.f.concurrency:
                return self._serve(r, now, arrived, service)
        for r in self.by_model[m]:  # one loading with room in its first batch: wait for it
            if r.ready_at > now and len(r.queue) + r.running < self.f.concurrency:
                r.queue.append((arrived, service))
                return
        if self.place(m, now):
            self.by_model[m][-1].queue.append((arrived, service))
        else:
            self.waiting.append((arrived, m, service))

    def _serve(self, r: Replica, now: float, arrived: float, service: float) -> None:
        self.latency.append(now - arrived)
        r.running += 1
        self.push(now + service, "done", r)

    def run(self, arrivals: list[tuple[float, int, float]]) -> None:
        for t, m, s in arrivals:
            self.push(t, "arrive", (m, s))
        while self.events:
            now, _, kind, obj = heapq.heappop(self.events)
            if kind == "arrive":
                self.arrive(now, *obj)
            elif kind == "ready" and not obj.gone:
                q, obj.queue = obj.queue, []
                for arrived, s in q:
                    self._serve(obj, now, arrived, s)
            elif kind == "done":
                obj.running -= 1
                obj.idle_since = now
                if obj.running == 0:
                    self.push(now + self.f.keep_alive_s, "expire", obj)
                self._retry(now)
            elif kind == "expire" and not obj.gone and obj.running == 0 and not obj.queue \
                    and now - obj.idle_since >= self.f.keep_alive_s - 1e-9:
                self._drop(obj)
                self._retry(now)

    def _retry(self, now: float) -> None:
        """Room may have freed: the waiting requests again, in arrival order; once a model finds no room,
        its later requests and those of models as big or bigger wait on without another search."""
        waiting, self.waiting = self.waiting, []
        too_big = math.inf
        for arrived, m, s in waiting:
            if self.sizes[m] >= too_big:
                self.waiting.append((arrived, m, s))
                continue
            before = len(self.waiting)
            self.arrive(now, m, s, arrived)
            if len(self.waiting) > before:
                too_big = self.sizes[m]


def arrivals(kind: str, rates: list[float], hours: float, service_s: float, seed: int) -> list:
    rng = random.Random(seed)
    end, out = hours * 3600, []
    for m, lam in enumerate(rates):
        t, on = 0.0, True
        switch = rng.expovariate(1 / 60) if kind == "bursty" else math.inf
        while t < end:
            # bursty: on 1/5 of the time at 5x the rate, so the mean rate is the Poisson one
            rate = lam if kind == "poisson" else (5 * lam if on else 0.0)
            step = rng.expovariate(rate) if rate > 0 else math.inf
            if t + step >= switch:
                t, on = switch, not on
                switch = t + rng.expovariate(1 / (60 if on else 240))
                continue
            t += step
            out.append((t, m, rng.expovariate(1 / service_s)))
    return sorted(out)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--models", type=int, default=16)
    ap.add_argument("--min-gb", type=float, default=10.0)
    ap.add_argument("--max-gb", type=float, default=400.0)
    ap.add_argument("--rate", type=float, default=1.0, help="requests/s over all models (default 1)")
    ap.add_argument("--zipf", type=float, default=1.1, help="model popularity exponent")
    ap.add_argument("--service-s", type=float, default=20.0, help="mean request duration")
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--rates", default=None, metavar="FILE", help="bench/load.py output: packed warm / cold GB/s")
    ap.add_argument("--cache-gbps", type=float, default=None, help="packed load from page cache, GB/s")
    ap.add_argument("--disk-gbps", type=float, default=None, help="packed load from local disk, GB/s")
    ap.add_argument("--network-gbps", type=float, default=1.25, help="stated network rate (default 1.25: 10 GbE)")
    ap.add_argument("--gpu-gb", type=float, default=640.0, help="accelerator memory per node (default 640)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None, metavar="PNG")
    a = ap.parse_args(argv)
    r = Rates.measured(a.rates)
    cache, disk = r.cache_gbps, r.disk_gbps
    fleet = Fleet(nodes=a.nodes, gpu_gb=a.gpu_gb, cache_gbps=a.cache_gbps or cache, disk_gbps=a.disk_gbps or disk,
                  network_gbps=a.network_gbps)
    sizes = [round(a.min_gb * (a.max_gb / a.min_gb) ** (i / max(1, a.models - 1)), 1) for i in range(a.models)]
    if max(sizes) > fleet.gpu_gb:
        ap.error(f"a {max(sizes)} GB model does not fit a node's {fleet.gpu_gb} GB (--gpu-gb)")
    random.Random(a.seed).shuffle(sizes)  # popularity does not follow size
    weights = [1 / (i + 1) ** a.zipf for i in range(a.models)]
    rates = [a.rate * w / sum(weights) for w in weights]
    results = []
    for kind in ("poisson", "bursty"):
        arr = arrivals(kind, rates, a.hours, a.service_s, a.seed)
        for policy in ("locality", "random", "least_loaded"):
            sim = Sim(fleet, sizes, policy, a.seed)
            sim.run(arr)
            lat = sim.latency
            cold = [x for x in lat if x > 0]
            results.append({"arrivals": kind, "policy": policy, "requests": len(lat),
                            "startup_p50_s": round(pct(lat, 0.5), 2), "startup_p99_s": round(pct(lat, 0.99), 2),
                            "startup_mean_s": round(statistics.fmean(lat), 2) if lat else 0.0,
                            # the requests that waited for a load (or for room) at all
                            "waited": len(cold), "waited_p50_s": round(pct(cold, 0.5), 2),
                            "waited_p99_s": round(pct(cold, 0.99), 2),
                            "cold_starts": dict(sim.cold), "migrations": sim.migrations})
    out = {"fleet": fleet.__dict__, "model_gb": sizes, "rate_rps": a.rate, "hours": a.hours, "results": results}
    print(json.dumps(out, indent=1))
    if a.plot:
        plot(results, a.plot)
    return 0


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind in zip(axes, ("poisson", "bursty")):
        rows = [r for r in results if r["arrivals"] == kind]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["startup_p50_s"] for r in rows], 0.4, label="p50")
        ax.bar([i + 0.2 for i in x], [r["startup_p99_s"] for r in rows], 0.4, label="p99")
        ax.set_xticks(list(x), [f"{r['policy']}\n{r['migrations']} migr." for r in rows])
        ax.set_title(f"{kind} arrivals")
        ax.set_yscale("symlog")
    axes[0].set_ylabel("startup latency (s)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
