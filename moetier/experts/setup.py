"""Turn a model loaded without its routed experts into an offloaded one, within memory budgets."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional

import torch

from ..errors import MoetierError
from ..models.moe import SparseMoeBlock
from ..units import fmt_size
from .cache import make_policy
from .offload import ExpertTracer, OffloadedExperts, OffloadRuntime
from .prefetch import Prefetcher
from .store import ExpertStore
from .trace import TraceLibrary

log = logging.getLogger(__name__)

def packed_cache_dir(model_path: Path, dtype: torch.dtype, offload_dir: Optional[Path]) -> Path:
    """Where an HF folder's packed copy goes: ``offload_dir`` or a per-model user cache folder."""
    if offload_dir is not None:
        return Path(offload_dir) / f"packed-{str(dtype).removeprefix('torch.')}"
    key = hashlib.sha1(str(model_path.resolve()).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "moetier" / f"{model_path.name}-{key}-{str(dtype).removeprefix('torch.')}"


def moe_blocks(model) -> list[SparseMoeBlock]:
    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


def dense_bytes(model) -> int:
    """Bytes of every materialised parameter (the routed experts, still on meta, excluded) and of the
    quantized weights' codes and scales (buffers)."""
    quant = [b for b in model.buffers() if b.layout == torch.strided and b.device.type != "meta"]
    return sum(p.numel() * p.element_size() for p in [*model.parameters(), *quant] if p.device.type != "meta")


def attach_offload(model, packed, device: torch.device, device_memory: Optional[int], kv_reserve: int,
                   policy: str = "activation", prefetch: str = "lookahead", library_path: Optional[Path] = None,
                   expert_slots: Optional[int] = None, threads: int = 4,
                   host_memory: Optional[int] = None, verify: str = "first-read") -> tuple[OffloadRuntime, dict]:
    """Replace each MoE block's experts by ones served from ``packed`` through a slot pool.

    The pool gets what ``device_memory`` leaves after the dense weights and
    ``kv_reserve`` (or exactly ``expert_slots`` slots); fewer slots than one
    layer's experts is an error that says the smallest budget that works.
    ``host_memory`` (a GPU ``device``): a host tier of that many bytes of pinned
    expert slots between the disk and the device. ``verify``: when expert reads check their
    checksums (:mod:`moetier.weights.checksum`). Returns the runtime and the memory accounting.
    """
    from .sources import PackedSource

    blocks = moe_blocks(model)
    if not blocks:
        raise MoetierError("this model has no MoE layers to offload")
    num_experts = blocks[0].experts.num_experts
    source = PackedSource(packed, [_decoder_layer(model, b) for b in blocks], verify=verify)
    slot = source.layout.slot_bytes
    dense = dense_bytes(model)
    if expert_slots is None:
        slots = (device_memory - dense - kv_reserve) // slot
        budget = device_memory
    else:
        slots = expert_slots
        budget = device_memory if device_memory is not None else dense + kv_reserve + slots * slot
    if slots < num_experts or dense + kv_reserve + slots * slot > budget:
        want = max(num_experts, expert_slots or 0)
        need = dense + kv_reserve + want * slot
        raise MoetierError(
            f"device_memory {fmt_size(budget)} is too small: the dense weights take {fmt_size(dense)}, "
            f"the KV reserve {fmt_size(kv_reserve)} and {want} expert slots (at least one layer's "
            f"{num_experts} experts) {fmt_size(want * slot)}; give at least {fmt_size(need)}"
        )
    total = len(blocks) * num_experts
    slots = min(slots, total)
    host_slots = 0
    if host_memory is not None and device.type != "cpu":
        host_slots = min(host_memory // slot, total)
        if host_slots < threads:
            raise MoetierError(f"host_memory {fmt_size(host_memory)} is too small for a host tier: give at least "
                               f"{fmt_size(threads * slot)} ({threads} experts of {fmt_size(slot)}), or none")
    store = ExpertStore(source, slots, make_policy(policy, len(blocks)), device, threads=threads,
                        host_slots=host_slots)
    library = TraceLibrary.load(library_path, len(blocks), num_experts) if library_path else \
        TraceLibrary(len(blocks), num_experts)
    top_k = getattr(blocks[0].gate, "top_k", 2)
    prefetcher = Prefetcher(store, library, [b.gate for b in blocks], top_k, mode=prefetch)
    runtime = OffloadRuntime(store, prefetcher, ExpertTracer(len(blocks), num_experts), library_path)
    for i, b in enumerate(blocks):
        b.experts = OffloadedExperts(runtime, i, num_experts).adopt(b.experts)  # biases, activation variants
    log.info("offloading %d experts through %d slots (%s) on %s", total, slots, fmt_size(slots * slot), device)
    memory = {"device_budget": budget, "dense_bytes": dense, "kv_reserve": kv_reserve, "expert_slots": slots,
              "slot_bytes": slot, "device_bytes": dense + kv_reserve + store.nbytes,
              "experts_total_bytes": total * source.layout.nbytes,
              "host_bytes": store.host.nbytes if store.host is not None else 0}
    return runtime, memory


def kv_bytes_per_token(args, dtype: torch.dtype) -> int:
    """KV cache bytes one more token adds to a long sequence across all layers (the MLA latent for
    DeepSeek): its unbounded KV layers'; a sliding window or chunk stops growing at its limit and a
    fixed-size state never grows (``runtime.cache_spec.seq_bytes`` counts every kind)."""
    from ..runtime.cache_spec import kv_bytes_per_token as per_token

    return per_token(args, dtype)


def ensure_packed(path: Path, dtype, offload_dir: Optional[Path], quant=None) -> Path:
    """A packed checkpoint of ``path`` whose stored dtype is ``dtype`` (None: the checkpoint's),
    converting an HF folder on first use (with a progress bar) into ``offload_dir`` or a user cache.
    ``quant``: ``(experts scheme, dense scheme)`` (``kernels.quant.QuantScheme`` or None each) to
    quantize into the packed copy; a packed folder must already hold that quantization.

    The conversion is atomic (a kill leaves no folder that loads, and the next one cleans up)
    and locked, so processes starting at once on the same ``offload_dir`` convert it once."""
    from ..weights.atomic import FileLock
    from ..weights.packed import PackedCheckpoint, is_packed
    from ..weights.packed_write import convert

    if is_packed(path):
        with PackedCheckpoint(path) as ckpt:
            if dtype is not None and ckpt.dtype != dtype:
                raise MoetierError(
                    f"{path}: packed in {ckpt.dtype}; offloaded experts run in their stored dtype, so convert "
                    f"the original checkpoint with --dtype {str(dtype).removeprefix('torch.')}"
                )
            if quant is not None and any(quant):
                from ..weights.packed_quant import index_quant

                if ckpt.quant != index_quant(*quant):
                    raise MoetierError(f"{path}: packed with quantization {ckpt.quant}, not {index_quant(*quant)}; "
                                       f"load it without a quantization, or convert the original with --quant")
        return path
    from ..weights.loader import checkpoint_dtype, read_config
    from ..weights.safetensors import SafetensorsReader

    if dtype is None:
        with SafetensorsReader(path) as reader:
            dtype = checkpoint_dtype(read_config(path), reader)
    out = packed_cache_dir(path, dtype, offload_dir)
    q_experts, q_dense = quant if quant is not None else (None, None)
    if q_experts is not None or q_dense is not None:  # its own copy, named by the scheme
        tag = "-".join(f"{what}{s.kind}" + (f"g{s.group_size}" if s.group_size else "") + ("x" if s.exact else "")
                       for what, s in (("", q_experts), ("dense", q_dense)) if s is not None)
        out = out.with_name(f"{out.name}-{tag}")
    if not is_packed(out):
        from ..kernels.quant import QuantError

        # processes sharing offload_dir take turns; whoever comes second finds the folder done
        try:
            with FileLock(out.parent / f".{out.name}.lock"):
                if not is_packed(out):
                    log.warning("converting %s to the packed format in %s (once)", path, out)
                    convert(path, out, dtype=dtype, force=True, quant=q_experts or "none",
                            quant_dense=q_dense.kind if q_dense is not None else None)
        except QuantError as e:
            if q_experts is None or not q_experts.exact:
                raise
            # MXFP4 experts whose values int8 cannot hold in this dtype (an exponent out of its range)
            log.warning("%s: MXFP4 experts kept dequantized to %s (%s)", path, str(dtype).removeprefix("torch."), e)
            return ensure_packed(path, dtype, offload_dir, quant=(None, q_dense))
    return out


def _decoder_layer(model, block) -> int:
    for i, layer in enumerate(model.model.layers):
        if layer.mlp is block:
            return i
    raise AssertionError("MoE block outside the decoder layers")
