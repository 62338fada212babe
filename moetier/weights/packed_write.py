"""``moetier convert``: write a Hugging Face checkpoint folder in the packed format (layout in packed.py).

The source is read through the same name mapping and shape checks as the safetensors loader,
so a folder converts only if it would load, and the packed folder holds exactly the tensors the
model takes, under its own names. Tensors stream through one at a time (an expert at a time), so
memory stays small whatever the model's size. Everything is written into a hidden temporary
sibling of the output folder, which is renamed into place only once the index is written and
every file synced: an interrupted convert leaves no folder that looks complete, and the next
convert into the same place removes what it left (atomic.py). The free space is checked
before writing; running out midway is a DiskFullError too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .. import __version__
from ..errors import CheckpointError, MoetierError
from ..models.weights_map import ExpertPiece, layer_index
from ..units import parse_size
from .loader import _check_shape, checkpoint_dtype, is_expert_param, load_args, mapped_names, parse_dtype
from .atomic import new_folder
from .packed_quant import QUANT_VERSION, check_schemes, index_quant, write_quant_dense, write_quant_expert
from ..kernels.quant import QuantScheme, parse_scheme
from .views import stored_scheme
from ..models.quantize import dense_targets
from .packed import ALIGN, FORMAT, INDEX_NAME, VERSION, _bar, dtype_name, is_packed
from .direct_io import round_up
from .safetensors import SafetensorsReader

log = logging.getLogger(__name__)

DEFAULT_MAX_FILE_SIZE = 2 << 30
DROP_EVERY = 64 << 20  # written bytes synced and dropped from the page cache at a time (see _Writer)
# files that hold weights in some format; everything else at the top of the folder is copied
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".index.json")


@dataclass
class _ExpertLayer:
    """Where one layer's experts come from: per-expert hub tensors and/or fused 3D ones."""

    prefix: str  # model.layers.3.mlp.experts
    layer: int
    num_experts: int
    gate_up: tuple  # [2I, H]
    down: tuple  # [H, I]
    pieces: dict = field(default_factory=dict)  # (expert, "gate" | "up" | "down") -> checkpoint name
    fused: dict = field(default_factory=dict)  # "gate_up_proj" | "down_proj" -> checkpoint name of a 3D tensor

    def source(self, e: int, kind: str) -> Optional[list[str]]:
        if kind in self.fused:
            return [self.fused[kind]]
        parts = ("gate", "up") if kind == "gate_up_proj" else ("down",)
        names = [self.pieces.get((e, p)) for p in parts]
        return None if None in names else names


def _plan(reader: SafetensorsReader, family, args, expected: dict) -> tuple[dict[str, str], list[_ExpertLayer]]:
    """Map checkpoint tensors onto the model's parameters: ``(dense name -> checkpoint name, expert layers)``."""
    dense: dict[str, str] = {}
    layers: dict[str, _ExpertLayer] = {}

    def layer_of(target: str) -> _ExpertLayer:
        prefix = target.rsplit(".", 1)[0]
        if prefix not in layers:
            gu, dn = (tuple(expected[f"{prefix}.{k}"].shape) for k in ("gate_up_proj", "down_proj"))
            layers[prefix] = _ExpertLayer(prefix, layer_index(prefix + "."), gu[0], gu[1:], dn[1:])
        return layers[prefix]

    for hf_name, name in mapped_names(reader, family, args):
        if isinstance(name, ExpertPiece):
            if name.target not in expected:
                log.debug("ignoring expert tensor %s", hf_name)
                continue
            lay = layer_of(name.target)
            if name.expert >= lay.num_experts:
                raise CheckpointError(
                    f"{reader.file_of(hf_name)}: tensor {hf_name!r} is for expert {name.expert} "
                    f"but the config has {lay.num_experts} experts"
                )
            want = lay.down if name.part == "down" else (lay.gate_up[0] // 2, lay.gate_up[1])
            _check_shape(reader, hf_name, reader.shape(hf_name), want)
            lay.pieces[(name.expert, name.part)] = hf_name
            continue
        if name not in expected:
            log.debug("ignoring checkpoint tensor %s", hf_name)
            continue
        _check_shape(reader, hf_name, reader.shape(hf_name), tuple(expected[name].shape))
        if is_expert_param(name):
            layer_of(name).fused[name.rsplit(".", 1)[1]] = hf_name
        else:
            dense[name] = hf_name

    for lay in layers.values():
        for kind in ("gate_up_proj", "down_proj"):
            lacking = [e for e in range(lay.num_experts) if lay.source(e, kind) is None]
            if lacking:
                raise CheckpointError(
                    f"checkpoint lacks the {kind.removesuffix('_proj')} weight of expert {lacking[0]} "
                    f"for {lay.prefix}.{kind} ({len(lacking)} missing)"
                )
    covered = set(dense) | {f"{p}.{k}" for p in layers for k in ("gate_up_proj", "down_proj")}
    missing = [n for n in expected if n not in covered and not (n == "lm_head.weight" and args.tie_word_embeddings)]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    ordered = {n: dense[n] for n in expected if n in dense}  # the model's own order
    return ordered, sorted(layers.values(), key=lambda lay: lay.layer)


class _Writer:
    """Appends aligned regions to ``weights-NNNNN.bin`` files of bounded size."""

    def __init__(self, folder: Path, max_file_size: int, bar):
        self.folder, self.max, self.bar = folder, max_file_size, bar
        self.files: list[dict] = []
        self._fh = None
        self._pos = 0
        self._clean = 0  # bytes of the current file already synced and dropped from the page cache

    def write(self, groups: list[list[torch.Tensor]]) -> tuple[dict, list[int]]:
        """Write one region: each group of tensors back to back, each group starting ALIGN-aligned.

        Returns the region's file, offset, nbytes and checksum, and each group's offset in it.
        """
        sizes = [sum(t.numel() * t.element_size() for t in g) for g in groups]
        starts = [0]
        for n in sizes[:-1]:
            starts.append(starts[-1] + round_up(n))
        nbytes = starts[-1] + sizes[-1]
        if self._fh is None or (self._pos and self._pos + round_up(nbytes) > self.max):
            self._next_file()
        offset, crc = self._pos, 0
        for i, group in enumerate(groups):
            pad = bytes(starts[i] - (starts[i - 1] + sizes[i - 1])) if i else b""
            self._fh.write(pad)
            crc = zlib.crc32(pad, crc)
            for t in group:
                data = memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())
                self._fh.write(data)
                crc = zlib.crc32(data, crc)
        self._fh.write(bytes(round_up(nbytes) - nbytes))  # pad to the next aligned offset
        self._pos += round_up(nbytes)
        self.files[-1]["nbytes"] = self._pos
        if self._pos - self._clean >= DROP_EVERY:
            self._drop_written()
        if self.bar is not None:
            self.bar.update(sum(sizes))
        return {"file": self.files[-1]["name"], "offset": offset, "nbytes": nbytes, "checksum": crc}, starts

    def _next_file(self) -> None:
        self.close()
        name = f"weights-{len(self.files) + 1:05d}.bin"
        self._fh = open(self.folder / name, "wb")
        self._pos = self._clean = 0
        self.files.append({"name": name, "nbytes": 0})

    def _drop_written(self) -> None:
        """Sync what was written since the last call and drop it from the page cache: written
        pages stay cached (and, in a memory cgroup, charged to this process) until dropped."""
        self._fh.flush()
        os.fdatasync(self._fh.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fh.fileno(), self._clean, self._pos - self._clean, os.POSIX_FADV_DONTNEED)
        self._clean = self._pos

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            self._fh.close()
            self._fh = None


def _write_dense(w: _Writer, reader: SafetensorsReader, name: str, hf_name: str, dtype: torch.dtype,
                 quant=None) -> dict:
    t = reader.read(hf_name).to(dtype)
    if quant is not None:  # codes + scales (packed_quant.py)
        return write_quant_dense(w, name, t, quant, dtype)
    region, _ = w.write([[t]])
    return {"name": name, **region, "dtype": dtype_name(dtype), "shape": list(t.shape)}


def _write_expert(w: _Writer, reader: SafetensorsReader, lay: _ExpertLayer, e: int, dtype: torch.dtype,
                  quant=None) -> dict:
    """One (layer, expert) region: gate rows and up rows (together ``[2I, H]``), then, from the
    next aligned offset, down ``[H, I]``, so each part can also be read on its own with O_DIRECT."""
    groups = []
    for kind in ("gate_up_proj", "down_proj"):
        names = lay.source(e, kind)
        if kind in lay.fused:
            groups.append([reader.read(names[0], e).to(dtype)])
        else:
            groups.append([reader.read(n).to(dtype) for n in names])
    if quant is not None:  # codes + scales of each weight (packed_quant.py)
        return write_quant_expert(w, lay, e, torch.cat(groups[0]), groups[1][0], quant, dtype)
    region, (gu_offset, down_offset) = w.write(groups)
    return {
        "name": f"{lay.prefix}[{e}]", "layer": lay.layer, "expert": e, **region, "dtype": dtype_name(dtype),
        "parts": [{"name": f"{lay.prefix}.gate_up_proj", "offset": gu_offset, "shape": list(lay.gate_up)},
                  {"name": f"{lay.prefix}.down_proj", "offset": down_offset, "shape": list(lay.down)}],
    }


def convert(src: str | Path, dst: str | Path, dtype: str | torch.dtype | None = None,
            max_file_size: int | str = DEFAULT_MAX_FILE_SIZE, force: bool = False, progress: bool = True,
            quant=None, group_size: Optional[int] = None, quant_dense: Optional[str] = None) -> Path:
    """Write the checkpoint folder ``src`` to ``dst`` in the packed format; returns ``dst``.

    ``quant``: ``"int8"`` or ``"int4"`` routed experts (``group_size`` inputs per scale; int8
    default per-channel, int4 32), ``quant_dense``: ``"int8"`` (per-channel) attention, LM head
    and dense MLPs, or ``"none"``; scales in the stored dtype (kernels/quant.py, packed_quant.py).
    ``quant`` may also be a ``kernels.quant.QuantScheme``. MXFP4 experts (gpt-oss) are written as
    ``kernels.quant.MXFP4_INT8`` (exactly their values) unless ``quant`` names another kind or ``"none"``.

    ``dtype``: stored dtype (default: the checkpoint's own, so outputs are bit-identical; router
    weights a family keeps in float32 stay float32). ``max_file_size``: bytes per weight file
    (a region larger than that gets a file of its own). ``force``: replace a non-empty ``dst``.
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    expert_scheme = quant if isinstance(quant, QuantScheme) else parse_scheme(quant, group_size)
    dense_scheme = parse_scheme(quant_dense)
    max_file_size = parse_size(max_file_size)
    if max_file_size < ALIGN:
        raise ValueError(f"max_file_size must be at least {ALIGN} bytes, got {max_file_size}")
    if is_packed(src):
        raise MoetierError(f"{src}: already a packed moetier checkpoint (it has {INDEX_NAME})")
    s, d = src.resolve(), dst.resolve()
    if d == s or d in s.parents:
        raise MoetierError(f"{dst}: the output folder must not be the source folder or hold it")
    if dst.exists() and not dst.is_dir():
        raise MoetierError(f"{dst}: exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise MoetierError(f"{dst}: exists and is not empty; pass --force to replace it")
    family, args, raw = load_args(src)
    with family.weights.open(SafetensorsReader(src)) as reader:
        source_dtype = checkpoint_dtype(raw, reader)
        if quant is None and getattr(reader, "mxfp4", False):  # kept as stored, exactly (weights/views.py)
            expert_scheme = stored_scheme(src)
        target = parse_dtype(dtype) or source_dtype
        with torch.device("meta"):
            meta_model = family.build(args)
            expected = dict(meta_model.named_parameters())
        dense, layers = _plan(reader, family, args, expected)
        dense_q = set(dense_targets(meta_model)) & set(dense) if dense_scheme is not None else set()
        check_schemes(expert_scheme, dense_scheme, layers, {n: tuple(expected[n].shape) for n in dense_q})
        dense_dtype = {n: torch.float32 if family.weights.keeps_fp32(n) else target for n in dense}
        total = sum(expected[n].numel() * dense_dtype[n].itemsize for n in dense)
        total += sum(expected[f"{lay.prefix}.{k}"].numel() * target.itemsize
                     for lay in layers for k in ("gate_up_proj", "down_proj"))
        need = _needed_bytes(src, expected, dense_dtype, layers, target)
        bar = _bar(total, "Converting", progress)
        try:
            # a hidden sibling, renamed into place once the index is written (last) and all synced
            with new_folder(dst, need) as tmp:
                writer = _Writer(tmp, max_file_size, bar)
                try:
                    tensors = [_write_dense(writer, reader, n, h, dense_dtype[n], dense_scheme if n in dense_q else None)
                               for n, h in dense.items()]
                    experts = [_write_expert(writer, reader, lay, e, target, expert_scheme)
                               for lay in layers for e in range(lay.num_experts)]
                finally:
                    writer.close()
                _copy_aside(src, tmp, raw, target, source_dtype)
                quant_info = index_quant(expert_scheme, dense_scheme)
                index = {"format": FORMAT, "version": VERSION if quant_info is None else QUANT_VERSION,
                         "alignment": ALIGN, "checksum": "crc32",
                         "dtype": dtype_name(target), "model_type": raw.get("model_type"),
                         "created_by": f"moetier {__version__}", "files": writer.files,
                         "tensors": tensors, "experts": experts, **({"quant": quant_info} if quant_info else {})}
                _write_synced(tmp / INDEX_NAME, json.dumps(index, indent=1))
        finally:
            if bar is not None:
                bar.close()
    return dst


def _needed_bytes(src: Path, expected: dict, dense_dtype: dict, layers: list[_ExpertLayer],
                  target: torch.dtype) -> int:
    """Bytes the packed folder will take: every region padded to ALIGN, the copied files, the index."""
    need = sum(round_up(expected[n].numel() * dt.itemsize) for n, dt in dense_dtype.items())
    for lay in layers:
        gu, dn = (math.prod(s) * target.itemsize for s in (lay.gate_up, lay.down))
        need += lay.num_experts * round_up(round_up(gu) + dn)
    need += sum(f.stat().st_size for f in src.iterdir()
                if f.is_file() and not f.name.startswith(".") and not f.name.endswith(_WEIGHT_SUFFIXES))
    return need + 512 * (len(dense_dtype) + sum(lay.num_experts for lay in layers)) + ALIGN  # ~ the index


def _copy_aside(src: Path, dst: Path, raw: dict, target: torch.dtype, source_dtype: torch.dtype) -> None:
    """Copy config, generation config, tokenizer and other non-weight files; record a new dtype."""
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if f.name == "config.json" and target != source_dtype:
            cfg = dict(raw)
            for key in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]:
                cfg[key] = dtype_name(target)
            _write_synced(dst / f.name, json.dumps(cfg, indent=2) + "\n")
        else:
            shutil.copy2(f, dst / f.name)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
