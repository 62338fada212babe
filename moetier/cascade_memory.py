"""Dividing a memory budget between a cascade's models by their share of the traffic.

Every request reaches the first model; only the escalated ones reach the next. A model that is
offloaded reads its experts from disk for each request that reaches it, so the bytes kept
resident are worth most where the traffic per byte is highest. :func:`plan_memory` keeps
models resident in that order while they fit the budget, and runs the others offloaded
(:class:`~moetier.LLM` with ``device_memory``) within what is left, split between them by
their traffic. The traffic comes from a calibration file (the share each model answered on the
task) or, without one, is taken as every model seeing every request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence as Seq

from .cascade import CascadeError
from .units import fmt_size

# what a loaded model holds beyond its weight files (KV reserve, buffers), as a share of the files
OVERHEAD = 0.15


def weights_bytes(model: str) -> int:
    """Bytes of a model folder's weight files (``demo`` names resolved)."""
    from .llm import resolve_model_path

    folder = resolve_model_path(model)
    return sum(f.stat().st_size for pat in ("*.safetensors", "weights-*.bin") for f in Path(folder).glob(pat))


def reach_shares(data: dict) -> list[float]:
    """The share of requests that reaches each model: from a calibration file's answered shares,
    else 1 for every model (nothing measured)."""
    models = data["models"]
    answered = (data.get("calibration") or {}).get("answered_share")
    if not answered:
        return [1.0] * len(models)
    reach, left = [], 1.0
    for m in models:
        reach.append(left)
        left -= answered.get(m, 0.0)
    return reach


@dataclass
class MemoryPlan:
    budget: int
    names: list[str]
    need: list[int]  # bytes each model holds loaded whole
    reach: list[float]  # share of requests reaching each model
    device_memory: list[Optional[int]] = field(default_factory=list)  # None: resident; else its offload budget

    def explain(self) -> str:
        measured = "measured on the calibration task" if any(r < 1 for r in self.reach[1:]) else \
            "not measured (no calibration file): every model counted as seeing every request"
        lines = [f"cascade memory: {fmt_size(self.budget)} budget, split by each model's share of the "
                 f"requests ({measured}) per byte"]
        for n, need, r, dm in zip(self.names, self.need, self.reach, self.device_memory):
            where = "resident" if dm is None else f"offloaded, experts cached within {fmt_size(dm)}"
            lines.append(f"  {n}: {fmt_size(need)} whole, reached by {100 * r:.0f} % of requests -> {where}")
        return "\n".join(lines)


def plan_memory(names: Seq[str], need: Seq[int], reach: Seq[float], budget: int) -> MemoryPlan:
    """Keep models resident, most requests per byte first, while they fit ``budget``; the others run
    offloaded within the rest, split by their reach (a CascadeError when nothing is left for them)."""
    if budget <= 0:
        raise CascadeError(f"the memory budget must be positive, got {budget}")
    order = sorted(range(len(names)), key=lambda i: -reach[i] / max(1, need[i]))
    left = budget
    resident = set()
    for i in order:
        if need[i] <= left:
            resident.add(i)
            left -= need[i]
    off = [i for i in range(len(names)) if i not in resident]
    dm: list[Optional[int]] = [None] * len(names)
    if off:
        if left <= 0:
            raise CascadeError(f"the budget of {fmt_size(budget)} leaves nothing for {', '.join(names[i] for i in off)} "
                               "once the others are resident")
        weight = sum(max(reach[i], 1e-3) for i in off)
        for i in off:
            dm[i] = int(left * max(reach[i], 1e-3) / weight)
    return MemoryPlan(budget, list(names), list(need), list(reach), dm)


def plan_for(data: dict, budget: int) -> MemoryPlan:
    """:func:`plan_memory` for a cascade spec (``{"models", ...}`` and, from a calibration file, its shares)."""
    need = [int(weights_bytes(m) * (1 + OVERHEAD)) for m in data["models"]]
    return plan_memory(data["models"], need, reach_shares(data), budget)
