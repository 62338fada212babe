"""Where a new replica of a model goes, after ServerlessLLM: on the node that would start it fastest.

A replica's startup is a fixed set-up time plus the checkpoint's bytes over the rate of the tier
each byte comes from on that node: the page cache, the local disk (moetier's packed format, or
the HF folder), or the network (the model is not on the node; the engine fetches it, a hub id).
Each node reports what it holds (:func:`probe`, run there: file sizes, and ``mincore`` for the
bytes the page cache holds, which reads nothing); :func:`rank` orders the nodes by the estimate
and :func:`actor_options` turns the order into Ray's own ``label_selector`` (the fastest nodes)
and ``fallback_strategy`` (the next ones, in order) for the model's deployment, so Ray Serve
places each new replica on the fastest node that has room. A node where a local path is missing
cannot start the model and is left out.

The same estimate drives the simulation of the policy over a fleet (bench/cluster_sim.py). Nothing
here imports Ray.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

TIERS = ("cache", "disk", "remote")
NODE_LABEL = "ray.io/node-id"  # the label Ray gives every node: its id
GB = 1e9


@dataclass
class Rates:
    """GB/s of each tier a checkpoint is read from, and the set-up time of a replica, any tier."""

    cache_gbps: float = 6.0  # the packed loader from the page cache (bench/load.py, warm)
    disk_gbps: float = 1.5  # the packed loader from the local disk (bench/load.py, cold)
    network_gbps: float = 1.25  # stated, not measured (10 GbE)
    start_s: float = 2.0  # process start and engine set-up

    def rate(self, tier: str) -> float:
        return {"cache": self.cache_gbps, "disk": self.disk_gbps, "remote": self.network_gbps}[tier]

    def startup_s(self, gb: dict) -> float:
        """The estimate for ``gb``: {tier: GB read from it}."""
        return self.start_s + sum(v / self.rate(t) for t, v in gb.items() if v)

    @classmethod
    def measured(cls, path: Optional[str] = None, **stated) -> "Rates":
        """The page-cache and disk rates from bench/load.py's JSON lines (packed, warm / cold) at ``path``,
        else the defaults; ``stated``: fields given outright (network_gbps, start_s...)."""
        r = cls()
        if path:
            for line in open(path):
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if row.get("what") == "packed" and "gbps" in row:
                    if row.get("cache") == "warm":
                        r.cache_gbps = row["gbps"]
                    elif row.get("cache") == "cold":
                        r.disk_gbps = row["gbps"]
        for k, v in stated.items():
            if v is not None:
                setattr(r, k, v)
        return r


@dataclass
class Holding:
    """What one node holds of one model's checkpoint."""

    tier: str  # cache (every byte in the page cache), disk, remote (not here; fetched), none (cannot start here)
    nbytes: int = 0  # the checkpoint's weight bytes (0: unknown here)
    cached: int = 0  # of which the page cache holds
    packed: bool = False  # moetier's packed format (moetier convert)

    def startup_s(self, rates: Rates, nbytes: Optional[int] = None) -> float:
        """The estimate on this node; ``nbytes``: the size where this node does not know it (remote)."""
        if self.tier == "none":
            return math.inf
        if self.tier == "remote":
            return rates.startup_s({"remote": (nbytes or self.nbytes) / GB})
        return rates.startup_s({"cache": self.cached / GB, "disk": (self.nbytes - self.cached) / GB})


def _weight_files(p: Path) -> tuple[list[Path], bool]:
    if p.is_file():
        return [p], False
    if (p / "moetier-index.json").is_file():
        return sorted(p.glob("weights-*.bin")), True
    files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.gguf")) or sorted(p.glob("*.bin"))
    return files, False


def holding(path: str) -> Holding:
    """What this machine holds of the checkpoint at ``path`` (a folder, a .gguf, or a hub id)."""
    from ..weights.direct_io import PageCache

    p = Path(path).expanduser()
    if not p.exists():
        # a hub id (or a built-in model) is fetched or built where it runs; a missing local path cannot be
        return Holding("none" if path.startswith(("/", ".", "~")) else "remote")
    files, packed = _weight_files(p)
    nbytes = cached = 0
    for f in files:
        try:
            size = f.stat().st_size
        except OSError:
            continue
        nbytes += size
        if size:
            try:
                fd = os.open(f, os.O_RDONLY)
                try:
                    pc = PageCache(fd)
                finally:
                    os.close(fd)
                cached += pc.resident()
                pc.close()
            except (OSError, ValueError):
                pass
    return Holding("cache" if nbytes and cached >= 0.99 * nbytes else "disk", nbytes, min(cached, nbytes), packed)


def probe(models: dict[str, str]) -> dict[str, dict]:
    """This node's report: {model: Holding as a dict} for each {model: path}."""
    return {m: asdict(holding(path)) for m, path in models.items()}


def rank(reports: dict[str, dict], model: str, rates: Rates) -> list[tuple[float, str]]:
    """The nodes that can start ``model``, fastest first: [(estimate s, node id)]; ``reports``:
    {node id: that node's :func:`probe`}."""
    held = {n: Holding(**r[model]) for n, r in reports.items() if model in r}
    size = max((h.nbytes for h in held.values()), default=0)  # what a node that fetches it reads
    out = [(h.startup_s(rates, size), n) for n, h in held.items()]
    return sorted((round(s, 3), n) for s, n in out if math.isfinite(s))


def actor_options(ranked: list[tuple[float, str]], nodes: int, tie: float = 0.05) -> dict:
    """``label_selector`` (the fastest nodes: within ``tie`` of the best) and ``fallback_strategy``
    (the others, group by group, slower last) for a deployment's ``ray_actor_options``; {} when
    every one of the cluster's ``nodes`` is as fast (Ray Serve's own spread then)."""
    groups: list[list[str]] = []
    best = None
    for s, n in ranked:
        if groups and s <= best * (1 + tie) + 1e-9:
            groups[-1].append(n)
        else:
            groups.append([n])
            best = s
    if not groups or (len(groups) == 1 and len(groups[0]) >= nodes):
        return {}
    sel = [{NODE_LABEL: f"in({','.join(g)})"} for g in groups]
    opts = {"label_selector": sel[0]}
    if len(sel) > 1:
        opts["fallback_strategy"] = [{"label_selector": s} for s in sel[1:]]
    return opts
