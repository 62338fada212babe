"""Turn a model loaded without its routed experts into an offloaded one, within memory budgets."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Optional

import torch

from ..errors import MoetierError
from ..models.moe import SparseMoeBlock
from .cache import make_policy
from .offload import ExpertTracer, OffloadedExperts, OffloadRuntime
from .prefetch import Prefetcher
from .store import ExpertStore
from .trace import TraceLibrary

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: str | int | float | None) -> Optional[int]:
    """``"6GiB"``, ``"512MB"``, ``2_000_000`` -> bytes; None stays None."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a memory size; write e.g. 6GiB, 512MiB or 2GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def packed_cache_dir(model_path: Path, dtype: torch.dtype, offload_dir: Optional[Path]) -> Path:
    """Where an HF folder's packed copy goes: ``offload_dir`` or a per-model user cache folder."""
    if offload_dir is not None:
        return Path(offload_dir) / f"packed-{str(dtype).removeprefix('torch.')}"
    key = hashlib.sha1(str(model_path.resolve()).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "moetier" / f"{model_path.name}-{key}-{str(dtype).removeprefix('torch.')}"


def moe_blocks(model) -> list[SparseMoeBlock]:
    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


def dense_bytes(model) -> int:
    """Bytes of every materialised parameter (the routed experts, still on meta, excluded)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


def attach_offload(model, packed, device: torch.device, device_memory: int, kv_reserve: int,
                   policy: str = "activation", prefetch: str = "trace", library_path: Optional[Path] = None,
                   threads: int = 4) -> OffloadRuntime:
    """Replace each MoE block's experts by ones served from ``packed`` through a slot pool.

    The pool gets what ``device_memory`` leaves after the dense weights and
    ``kv_reserve``; fewer slots than one layer's experts is an error that says
    the smallest budget that works.
    """
    from .sources import PackedSource

    blocks = moe_blocks(model)
    if not blocks:
        raise MoetierError("this model has no MoE layers to offload")
    num_experts = blocks[0].experts.num_experts
    source = PackedSource(packed, [_decoder_layer(model, b) for b in blocks])
    slot = source.layout.slot_bytes
    dense = dense_bytes(model)
    slots = (device_memory - dense - kv_reserve) // slot
    if slots < num_experts:
        need = dense + kv_reserve + num_experts * slot
        raise MoetierError(
            f"device_memory {fmt_size(device_memory)} is too small: the dense weights take {fmt_size(dense)}, "
            f"the KV reserve {fmt_size(kv_reserve)} and one layer's {num_experts} experts "
            f"{fmt_size(num_experts * slot)}; give at least {fmt_size(need)}"
        )
    total = len(blocks) * num_experts
    slots = min(slots, total)
    store = ExpertStore(source, slots, make_policy(policy, len(blocks)), device, threads=threads)
    library = TraceLibrary.load(library_path, len(blocks), num_experts) if library_path else \
        TraceLibrary(len(blocks), num_experts)
    top_k = getattr(blocks[0].gate, "top_k", 2)
    prefetcher = Prefetcher(store, library, [b.gate for b in blocks], top_k, mode=prefetch)
    runtime = OffloadRuntime(store, prefetcher, ExpertTracer(len(blocks), num_experts), library_path)
    for i, b in enumerate(blocks):
        b.experts = OffloadedExperts(runtime, i, num_experts)
    log.info("offloading %d experts through %d slots (%s) on %s", total, slots, fmt_size(slots * slot), device)
    return runtime


def _decoder_layer(model, block) -> int:
    for i, layer in enumerate(model.model.layers):
        if layer.mlp is block:
            return i
    raise AssertionError("MoE block outside the decoder layers")
