"""Quantized regions of the packed format: how ``moetier convert --quant`` writes them and how the
index describes them (the rest of the format is in packed.py).

A quantized tensor's index entry (dense) or part (expert) carries, besides its logical ``shape``
``[N, K]`` and offset, a ``quant`` object::

    "quant": {"kind": "int4", "group_size": 32, "scales_dtype": "bfloat16", "layout": "b64s"}

Its bytes are the codes, then from the next ALIGN boundary the scales (``kernels/quant.py`` gives
both layouts; ``kernels/region.py`` places an expert's two weights). An expert region's ``dtype``
is its scales' dtype. An index with any quantized region has ``"version": 2`` and a top-level
``"quant": {"experts": {"kind", "group_size"} | null, "dense": ... | null}``; version-1 readers
refuse it rather than misread it.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import CheckpointError
from ..kernels.quant import (DEFAULT_GROUP, INT4_GROUPS, INT4_ORDERS, KINDS, QuantError, QuantScheme, QuantSpec,
                             QuantWeight, quantize, spec_of)
from ..kernels.region import ALIGN, QuantExpertLayout

QUANT_VERSION = 2
_SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_spec(raw, shape: tuple[int, ...], where: str) -> QuantSpec:
    """The QuantSpec an index entry's ``quant`` object describes; a CheckpointError naming ``where``."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: malformed quant: {what}")

    if not isinstance(raw, dict):
        raise bad(f"{raw!r} is not a JSON object")
    kind, group, sd, layout = raw.get("kind"), raw.get("group_size"), raw.get("scales_dtype"), raw.get("layout", "")
    if kind not in KINDS:
        raise bad(f"kind {kind!r} (known: {', '.join(KINDS)})")
    if len(shape) != 2:
        raise bad(f"shape {list(shape)} is not 2D")
    N, K = shape
    if not isinstance(group, int) or isinstance(group, bool) or group <= 0 or K % group:
        raise bad(f"group_size {group!r} for {K} inputs")
    if sd not in _SCALE_DTYPES:
        raise bad(f"scales_dtype {sd!r}")
    if kind == "int4" and (group not in INT4_GROUPS or layout not in INT4_ORDERS or N % 2 or K % 2):
        raise bad(f"int4 with group_size {group}, layout {layout!r}, shape {list(shape)}")
    return QuantSpec(kind, (N, K), group, _SCALE_DTYPES[sd], layout if kind == "int4" else "")


def check_schemes(experts: Optional[QuantScheme], dense: Optional[QuantScheme], layers, dense_shapes: dict) -> None:
    """Fail before anything is written if a scheme's group size does not fit a weight it would quantize."""
    try:
        if experts is not None:
            for lay in layers[:1]:
                experts.group_for(lay.gate_up[1], f"{lay.prefix}.gate_up_proj")
                experts.group_for(lay.down[1], f"{lay.prefix}.down_proj")
                if experts.kind == "int4" and (lay.gate_up[0] % 2 or lay.down[0] % 2):
                    raise QuantError(f"{lay.prefix}: int4 needs an even number of output rows")
        if dense is not None:
            for name, shape in dense_shapes.items():
                dense.group_for(shape[1], name)
    except QuantError as e:
        raise QuantError(f"cannot quantize this checkpoint: {e}") from None


def _quantized(t, scheme: Optional[QuantScheme], dtype: torch.dtype, what: str) -> QuantWeight:
    """``t`` as a QuantWeight: quantized by ``scheme``, or as it is when it already is one (e.g. GGUF
    blocks carried over without re-quantizing)."""
    return t if isinstance(t, QuantWeight) else quantize(t, scheme, dtype=dtype, what=what)


def write_quant_dense(w, name: str, t, scheme: Optional[QuantScheme], dtype: torch.dtype) -> dict:
    """One dense region: ``t`` (a tensor quantized by ``scheme`` with scales in ``dtype``, or a
    QuantWeight written as it is), codes then scales."""
    qw = _quantized(t, scheme, dtype, name)
    region, _ = w.write([[qw.codes], [qw.scales]])
    return {"name": name, **region, "dtype": str(dtype).removeprefix("torch."), "shape": list(qw.shape),
            "quant": spec_of(qw).to_json()}


def write_quant_expert(w, lay, e: int, gate_up, down, scheme: Optional[QuantScheme], dtype: torch.dtype) -> dict:
    """One expert region laid out as ``kernels.region.QuantExpertLayout`` (slots and resident experts too).
    ``gate_up`` ``[2I, H]`` / ``down`` ``[H, I]``: tensors quantized by ``scheme`` (scales in ``dtype``), or
    QuantWeights written as they are. ``lay`` needs ``prefix``, ``layer``, ``gate_up`` and ``down`` (shapes)."""
    gu = _quantized(gate_up, scheme, dtype, f"{lay.prefix}.gate_up_proj")
    dn = _quantized(down, scheme, dtype, f"{lay.prefix}.down_proj")
    region, (gu_offset, _, down_offset, _) = w.write([[gu.codes], [gu.scales], [dn.codes], [dn.scales]])
    layout = QuantExpertLayout(spec_of(gu), spec_of(dn))
    assert down_offset == layout.down_offset and region["nbytes"] == layout.nbytes  # the writer aligns each group
    return {
        "name": f"{lay.prefix}[{e}]", "layer": lay.layer, "expert": e, **region,
        "dtype": str(dtype).removeprefix("torch."),
        "parts": [{"name": f"{lay.prefix}.gate_up_proj", "offset": gu_offset, "shape": list(lay.gate_up),
                   "quant": layout.gate_up_spec.to_json()},
                  {"name": f"{lay.prefix}.down_proj", "offset": down_offset, "shape": list(lay.down),
                   "quant": layout.down_spec.to_json()}],
    }


def quant_layout(parts) -> QuantExpertLayout:
    """The layout of an expert region whose two parts (gate_up, down) are quantized."""
    return QuantExpertLayout(parts[0].quant, parts[1].quant)


def _storage(nbytes: int, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        from .direct_io import aligned_buffer

        return aligned_buffer(nbytes)
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def load_quant_jobs(ckpt, expected: dict, device: torch.device, out: Optional[dict]) -> list:
    """Loader jobs for a packed folder's quantized regions (``PackedCheckpoint.load_state``): each
    dense one into aligned bytes of its own, each layer's experts into ``[E, slot_bytes]`` bytes laid out
    as the expert store's slots; ``out`` receives the QuantWeights / (layout, regions) as the jobs
    will fill them."""
    from .packed_load import Job, Segment

    jobs = []
    dense = [r for r in ckpt.tensors.values() if r.parts[0].quant is not None and r.name in expected]
    experts = [r for r in ckpt.experts.values() if r.parts[0].quant is not None and r.parts[0].name in expected]
    if (dense or experts) and out is None:
        raise CheckpointError(f"{ckpt.index_path}: holds quantized weights, which this loader cannot take")
    for r in dense:
        spec = r.parts[0].quant
        want = tuple(expected[r.name].shape)
        if spec.shape != want:
            raise CheckpointError(f"{r.path}: {r.what} has shape {list(spec.shape)}, expected {list(want)} from "
                                  f"config.json")
        buf = _storage(r.read_nbytes, device)
        jobs.append(Job(r, [Segment(0, r.nbytes, buf[: r.nbytes], torch.uint8)]))
        out[r.name] = spec.view(buf, ALIGN)
    layers: dict[str, tuple] = {}
    for r in sorted(experts, key=lambda r: (r.layer, r.expert)):
        gu_name = r.parts[0].name
        prefix = gu_name.rsplit(".", 1)[0]
        full = tuple(expected[gu_name].shape)  # [E, 2I, H]
        dn_full = tuple(expected[f"{prefix}.down_proj"].shape)
        layout = quant_layout(r.parts)
        if (layout.gate_up, layout.down) != (full[1:], dn_full[1:]):
            raise CheckpointError(f"{r.path}: {r.what} has shapes {list(layout.gate_up)}, {list(layout.down)}, "
                                  f"expected {list(full[1:])}, {list(dn_full[1:])} from config.json")
        if r.expert >= full[0]:
            raise CheckpointError(f"{r.path}: {r.what} is expert {r.expert} but the config has {full[0]} experts")
        if prefix not in layers:
            layers[prefix] = (layout, _storage(full[0] * layout.slot_bytes, device).view(full[0], -1), set())
        lay_layout, regions, seen = layers[prefix]
        if layout != lay_layout:
            raise CheckpointError(f"{r.path}: {r.what} is quantized unlike expert 0 of its layer")
        jobs.append(Job(r, [Segment(0, r.nbytes, regions[r.expert, : r.nbytes], torch.uint8)]))
        seen.add(r.expert)
    for prefix, (layout, regions, seen) in layers.items():
        lacking = sorted(set(range(regions.shape[0])) - seen)
        if lacking:
            raise CheckpointError(f"{ckpt.index_path}: lacks expert {lacking[0]} of {prefix} ({len(lacking)} missing)")
        out[prefix] = (layout, regions)
    return jobs


def index_quant(experts: Optional[QuantScheme], dense: Optional[QuantScheme]) -> Optional[dict]:
    """The index's top-level ``quant`` object (None: nothing quantized)."""
    if experts is None and dense is None:
        return None

    def one(s):  # group_size None: int8 per-channel
        return None if s is None else {"kind": s.kind, "group_size": s.group_size or DEFAULT_GROUP[s.kind]}

    return {"experts": one(experts), "dense": one(dense)}


__all__ = ["ALIGN", "QUANT_VERSION", "check_schemes", "index_quant", "parse_spec", "write_quant_dense",
           "write_quant_expert"]
