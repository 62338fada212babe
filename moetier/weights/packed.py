"""The packed checkpoint format: moetier's own layout, made for fast loads and one-read experts.

A packed folder holds::

    moetier-index.json                     the index (below); its presence marks the folder as packed
    weights-00001.bin, weights-00002.bin   raw tensor bytes, each file at most --max-file-size
    config.json, generation_config.json, tokenizer files ...   copied from the source folder

Tensors are stored under moetier's own parameter names (the family's WeightMap already
applied, per-expert tensors already stacked), so loading maps no names. A file is a sequence of
*regions*, each starting at a multiple of ``ALIGN`` (4 KiB) and zero-padded to the next one:

- dense regions first, one tensor each (embeddings, attention, norms, routers, shared experts, head);
- then one region per (layer, expert), layer by layer, expert by expert, holding that expert's
  ``gate_up`` rows ``[2I, H]`` (gate rows, then up rows) and, from the next ALIGN boundary, its
  ``down`` rows ``[H, I]``: the expert store fetches one expert with one aligned read, into a
  slot laid out the same way (``experts.sources.layout_for``).

A region never spans two files (one larger than the file limit gets a file of its own), and
every file's size is a multiple of ``ALIGN``, so reads rounded up to whole blocks stay inside it.

The index (JSON)::

    {"format": "moetier-packed", "version": 1, "alignment": 4096, "checksum": "crc32",
     "dtype": "bfloat16", "model_type": "mixtral",
     "files":   [{"name": "weights-00001.bin", "nbytes": 8192}, ...],
     "tensors": [{"name": "model.embed_tokens.weight", "file": "weights-00001.bin", "offset": 0,
                  "nbytes": 4096, "dtype": "bfloat16", "shape": [32, 64], "checksum": 123}, ...],
     "experts": [{"name": "model.layers.0.mlp.experts[3]", "layer": 0, "expert": 3,
                  "file": ..., "offset": ..., "nbytes": ..., "dtype": ..., "checksum": ...,
                  "parts": [{"name": "model.layers.0.mlp.experts.gate_up_proj", "offset": 0, "shape": [2I, H]},
                            {"name": "model.layers.0.mlp.experts.down_proj", "offset": round_up(2I*H*bytes),
                             "shape": [H, I]}]}]}

``checksum`` is the CRC-32 (zlib) of the region's ``nbytes`` bytes (inner padding included, the
padding after the region not). Quantized tensors (``moetier convert --quant``) carry a ``quant``
object and hold codes then scales; their index is version 2 (packed_quant.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import CheckpointError
from .checksum import crc32, mismatch
from .direct_io import ALIGN, FileReader, aligned_buffer, round_up
from .storage import weight_storage
from .packed_quant import QUANT_VERSION, load_quant_jobs, parse_spec, quant_layout
from ..kernels.quant import QuantSpec
from .packed_load import DEFAULT_CHUNK, DEFAULT_THREADS, Job, Pipeline, Segment

log = logging.getLogger(__name__)

INDEX_NAME = "moetier-index.json"
FORMAT = "moetier-packed"
VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_packed(folder: str | Path) -> bool:
    """Whether ``folder`` holds a packed checkpoint (it has the index)."""
    return (Path(folder) / INDEX_NAME).is_file()


@dataclass(frozen=True)
class Part:
    """One tensor inside a region: bytes ``[offset, offset + nbytes)`` of the region."""

    name: str  # the parameter; for experts the stacked one, of which this is slice [expert]
    offset: int
    shape: tuple[int, ...]
    nbytes: int
    quant: Optional["QuantSpec"] = None  # a quantized weight: codes then scales (packed_quant.py)


@dataclass(frozen=True)
class Region:
    """One aligned, checksummed byte range of a file: a dense tensor, or one expert's weights."""

    name: str
    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    checksum: int
    parts: tuple[Part, ...]
    layer: Optional[int] = None
    expert: Optional[int] = None

    @property
    def read_nbytes(self) -> int:
        """Bytes one aligned read covers (``nbytes`` rounded up to ALIGN; the file is padded)."""
        return round_up(self.nbytes)

    @property
    def what(self) -> str:
        """How error messages name the region."""
        if self.expert is None:
            return f"tensor {self.name!r}"
        return f"tensor {self.name!r} (expert {self.expert} of layer {self.layer})"


class _Fields:
    """Typed access to one index entry; a missing or ill-typed field is a CheckpointError."""

    def __init__(self, index: Path, entry, where: str):
        if not isinstance(entry, dict):
            raise CheckpointError(f"{index}: malformed: {where} is not a JSON object")
        self.index, self.entry, self.where = index, entry, where

    def get(self, key: str, kind):
        v = self.entry.get(key)
        ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
        if not ok or (kind is int and v < 0):
            raise CheckpointError(f"{self.index}: malformed: {self.where} has {key}={v!r}")
        return v

    def shape(self, key: str = "shape") -> tuple[int, ...]:
        v = self.entry.get(key)
        if not isinstance(v, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v):
            raise CheckpointError(f"{self.index}: malformed: {self.where} has {key}={v!r}")
        return tuple(v)

    def dtype(self) -> torch.dtype:
        v = self.entry.get("dtype")
        if not isinstance(v, str) or v not in DTYPES:
            raise CheckpointError(f"{self.index}: malformed: {self.where} has dtype={v!r} (known: {', '.join(DTYPES)})")
        return DTYPES[v]


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


class PackedCheckpoint:
    """An opened packed folder: its regions, one-read expert access, verification and loading.

    Opening parses and checks the index and checks every file's size against it, so a missing
    or truncated file, or an index that points past a file's end, fails here with the file and
    a tensor named.
    """

    def __init__(self, folder: str | Path, direct: bool = True):
        self.folder = Path(folder)
        self.index_path = self.folder / INDEX_NAME
        raw = self._read_index()
        self.dtype: torch.dtype = DTYPES[raw["dtype"]]
        self.model_type: Optional[str] = raw.get("model_type")
        self.quant: Optional[dict] = raw.get("quant")  # {"experts": {kind, group_size} | None, "dense": ...}
        self.file_sizes: dict[str, int] = {}
        for i, f in enumerate(raw["files"]):
            fe = _Fields(self.index_path, f, f"files[{i}]")
            name = fe.get("name", str)
            if os.path.basename(name) != name or name in ("", ".", ".."):
                raise self._malformed(f"files[{i}] name {name!r} is not a plain file name")
            self.file_sizes[name] = fe.get("nbytes", int)
        self.tensors: dict[str, Region] = {}
        for i, e in enumerate(raw["tensors"]):
            r = self._dense(_Fields(self.index_path, e, f"tensors[{i}]"))
            if r.name in self.tensors:
                raise self._malformed(f"tensor {r.name!r} is listed twice")
            self.tensors[r.name] = r
        self.experts: dict[tuple[int, int], Region] = {}
        for i, e in enumerate(raw["experts"]):
            r = self._expert(_Fields(self.index_path, e, f"experts[{i}]"))
            if (r.layer, r.expert) in self.experts:
                raise self._malformed(f"expert {r.expert} of layer {r.layer} is listed twice")
            self.experts[(r.layer, r.expert)] = r
        self._check_files()
        self.reader = FileReader(direct=direct)

    # -- index -------------------------------------------------------------------------------

    def _malformed(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.index_path}: malformed: {what}")

    def _read_index(self) -> dict:
        path = self.index_path
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing (not a packed moetier checkpoint)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: malformed JSON ({e})") from e
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else None
            raise self._malformed(f"not a {FORMAT} index (format={found!r})")
        if raw.get("version") not in (VERSION, QUANT_VERSION):
            raise CheckpointError(
                f"{path}: format version {raw.get('version')!r} is not supported by this moetier (it reads "
                f"{VERSION} and {QUANT_VERSION}); "
                f"convert the model again"
            )
        if raw.get("alignment") != ALIGN:
            raise CheckpointError(f"{path}: malformed: alignment {raw.get('alignment')!r}, expected {ALIGN}")
        for key in ("files", "tensors", "experts"):
            if not isinstance(raw.get(key), list):
                raise CheckpointError(f"{path}: malformed: {key!r} is missing or not a list")
        if not isinstance(raw.get("dtype"), str) or raw["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: malformed: dtype {raw.get('dtype')!r}")
        return raw

    def _place(self, f: _Fields, name: str) -> tuple[Path, int, int, int]:
        file = f.get("file", str)
        if file not in self.file_sizes:
            raise self._malformed(f"tensor {name!r} is in {file!r}, which 'files' does not list")
        offset, nbytes = f.get("offset", int), f.get("nbytes", int)
        if offset % ALIGN:
            raise self._malformed(f"tensor {name!r} starts at {offset}, not a multiple of {ALIGN}")
        return self.folder / file, offset, nbytes, f.get("checksum", int)

    def _dense(self, f: _Fields) -> Region:
        name = f.get("name", str)
        path, offset, nbytes, crc = self._place(f, name)
        dtype, shape = f.dtype(), f.shape()
        spec = self._quant(f.entry, shape, f"tensor {name!r}")
        want = spec.nbytes(ALIGN) if spec is not None else _nbytes(shape, dtype)
        if nbytes != want:
            raise self._malformed(f"tensor {name!r} has nbytes={nbytes} but shape {list(shape)} of {dtype_name(dtype)}"
                                  + (f" quantized as {spec.kind}" if spec is not None else ""))
        return Region(name, path, offset, nbytes, dtype, crc, (Part(name, 0, shape, nbytes, spec),))

    def _quant(self, entry: dict, shape: tuple, what: str) -> Optional[QuantSpec]:
        if "quant" not in entry:
            return None
        return parse_spec(entry["quant"], shape, f"{self.index_path}: {what}")

    def _expert(self, f: _Fields) -> Region:
        name = f.get("name", str)
        path, offset, nbytes, crc = self._place(f, name)
        dtype, layer, expert = f.dtype(), f.get("layer", int), f.get("expert", int)
        parts_raw = f.get("parts", list)
        parts, end = [], 0
        for j, p in enumerate(parts_raw):
            pf = _Fields(self.index_path, p, f"{f.where}.parts[{j}]")
            shape = pf.shape()
            spec = self._quant(p, shape, f"tensor {name!r} part {j}")
            part = Part(pf.get("name", str), pf.get("offset", int), shape,
                        spec.nbytes(ALIGN) if spec is not None else _nbytes(shape, dtype), spec)
            if part.offset < end or part.offset % (ALIGN if spec is not None else dtype.itemsize):
                raise self._malformed(f"tensor {name!r} part {part.name!r} overlaps or is misaligned")
            end = part.offset + part.nbytes
            parts.append(part)
        if len(parts) != 2:
            raise self._malformed(f"tensor {name!r} has {len(parts)} parts, expected 2 (gate_up, down)")
        if end != nbytes:
            raise self._malformed(f"tensor {name!r} has nbytes={nbytes} but its parts span {end}")
        if (parts[0].quant is None) != (parts[1].quant is None) or (
                parts[0].quant is not None and (parts[0].offset, parts[1].offset) != (0, quant_layout(parts).down_offset)):
            raise self._malformed(f"tensor {name!r}: quantized parts not laid out as one quantized expert region")
        return Region(name, path, offset, nbytes, dtype, crc, tuple(parts), layer, expert)

    def regions(self) -> list[Region]:
        """Every region, in file order."""
        return sorted([*self.tensors.values(), *self.experts.values()], key=lambda r: (r.path.name, r.offset))

    def _check_files(self) -> None:
        by_file: dict[str, list[Region]] = {}
        for r in self.regions():
            by_file.setdefault(r.path.name, []).append(r)
        for name, recorded in self.file_sizes.items():
            path, regions = self.folder / name, by_file.get(name, [])
            first = regions[0].what if regions else "no tensors"
            try:
                actual = os.path.getsize(path)
            except FileNotFoundError:
                more = max(len(regions) - 1, 0)
                raise CheckpointError(
                    f"{path}: weight file is missing (the index puts {first} and {more} more in it)") from None
            prev_end = 0
            for r in regions:
                if r.offset < prev_end:
                    raise CheckpointError(
                        f"{self.index_path}: {r.what} overlaps the region before it in {path}; the index is corrupt")
                prev_end = r.offset + r.read_nbytes
                if r.offset + r.nbytes > recorded:
                    raise CheckpointError(
                        f"{path}: the index places {r.what} at bytes {r.offset}..{r.offset + r.nbytes}, past the end "
                        f"of the file ({recorded} bytes per the index); the index is corrupt"
                    )
            if actual < recorded:
                cut = next((r for r in regions if r.offset + r.read_nbytes > actual), regions[-1] if regions else None)
                cut_what = f"{cut.what} (bytes {cut.offset}..{cut.offset + cut.nbytes})" if cut else "no tensor"
                raise CheckpointError(
                    f"{path}: truncated: {actual} bytes, the index records {recorded}; {cut_what} is cut off")
            if actual != recorded:
                raise CheckpointError(
                    f"{path}: has {actual} bytes but the index records {recorded}; the folder is inconsistent")

    # -- reading -----------------------------------------------------------------------------

    def expert_region(self, layer: int, expert: int) -> Region:
        """Where expert ``expert`` of ``layer`` lives: file, offset, nbytes (one aligned read)."""
        try:
            return self.experts[(layer, expert)]
        except KeyError:
            raise CheckpointError(f"{self.index_path}: no expert {expert} in layer {layer}") from None

    def read_expert(self, layer: int, expert: int, verify: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One aligned read of an expert: ``(gate_up [2I, H], down [H, I])`` on the CPU, stored dtype.

        Both tensors are views of one new aligned host buffer holding the whole region.
        """
        r = self.expert_region(layer, expert)
        buf = aligned_buffer(r.read_nbytes)
        self.read_into(layer, expert, buf, verify)
        gate_up, down = (buf[p.offset : p.offset + p.nbytes].view(r.dtype).view(p.shape) for p in r.parts)
        return gate_up, down

    def read_into(self, layer: int, expert: int, out: torch.Tensor, verify: bool = False) -> None:
        """Fill ``out`` (uint8, CPU, e.g. a pinned staging slot) with the expert's region bytes.

        One read: O_DIRECT when ``out`` is 4 KiB-aligned and holds ``read_nbytes`` (else as much
        of it as is aligned), from the page cache when the bytes are there. With ``verify``, the
        region's CRC-32 is checked right after, in the calling (loader) thread; a mismatch is a
        CheckpointError naming the file, layer and expert. (Reading in pieces, one after another
        or several at once on more threads, to check some while others are read was slower on a
        2-core machine; the store's loader threads overlap the checks with the other reads.)
        """
        r = self.expert_region(layer, expert)
        if out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() < r.nbytes:
            raise ValueError(f"out must be a contiguous uint8 CPU tensor of at least {r.nbytes} bytes")
        self.reader.read(r.path, r.offset, out, r.nbytes, r.what)
        if verify:
            self._check_crc(r, memoryview(out.numpy())[: r.nbytes])

    def read_tensor(self, name: str, verify: bool = False) -> torch.Tensor:
        """A dense tensor, by parameter name, on the CPU in its stored dtype."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.index_path}: no tensor {name!r}")
        r = self.tensors[name]
        buf = aligned_buffer(r.read_nbytes)
        self.reader.read(r.path, r.offset, buf, r.nbytes, r.what)
        if verify:
            self._check_crc(r, memoryview(buf.numpy())[: r.nbytes])
        return buf[: r.nbytes].view(r.dtype).view(r.parts[0].shape)

    @staticmethod
    def _check_crc(r: Region, data: memoryview) -> None:
        crc = crc32(data)
        if crc != r.checksum:
            raise mismatch(r, crc)

    def verify(self, threads: int = DEFAULT_THREADS, progress: bool = False,
               regions: Optional[list[Region]] = None) -> int:
        """Re-read every region (or those of ``regions``) and check its checksum; returns the bytes checked.

        Raises one CheckpointError listing every corrupt region (the first few by name).
        """
        regions = self.regions() if regions is None else regions
        total = sum(r.nbytes for r in regions)
        bar = _bar(total, "Verifying", progress)
        try:
            pipe = Pipeline(self.reader, torch.device("cpu"), threads=threads, verify=True,
                            on_bytes=bar.update if bar else None)
            errors = pipe.run([Job(r, []) for r in regions], collect_errors=True)
        finally:
            if bar:
                bar.close()
        if errors:
            shown = "\n  ".join(str(e) for e in errors[:5])
            more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
            raise CheckpointError(f"{self.folder}: {len(errors)} corrupt region(s):\n  {shown}{more}")
        return total

    def load_state(self, weights, expected: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                   verify: bool = False, threads: int = DEFAULT_THREADS,
                   chunk_bytes: int = DEFAULT_CHUNK, quant: Optional[dict] = None) -> dict[str, torch.Tensor]:
        """Allocate every parameter in ``expected`` that the folder holds on ``device`` and fill it.

        ``weights`` is the family's WeightMap (which names stay float32); ``expected`` maps
        parameter names to the (meta) parameters of the model, whose shapes are checked.
        Quantized regions go to ``quant`` instead (an error if it is None): a dense weight as
        ``{name: QuantWeight}``, a layer's experts as ``{experts prefix: (QuantExpertLayout,
        regions [E, slot_bytes] uint8)}`` (``models.moe.Experts.install_regions``).
        """
        state: dict[str, torch.Tensor] = {}
        jobs: list[Job] = []
        quant_jobs = load_quant_jobs(self, expected, device, quant)

        def target(name: str, shape: tuple) -> torch.Tensor:
            if name not in state:
                want = torch.float32 if weights.keeps_fp32(name) else dtype
                # on the CPU, page-aligned memory of its own: O_DIRECT reads straight into it
                state[name] = weight_storage(shape, device, want)
            return state[name]

        for r in self.tensors.values():
            if r.parts[0].quant is not None:
                continue  # load_quant_jobs
            if r.name not in expected:
                log.debug("ignoring packed tensor %s", r.name)
                continue
            shape = tuple(expected[r.name].shape)
            _check_shape(r, r.parts[0].shape, shape)
            jobs.append(Job(r, [Segment(0, r.nbytes, target(r.name, shape).view(-1), r.dtype)]))
        filled: dict[str, set[int]] = {}
        for (layer, e), r in sorted(self.experts.items()):
            if r.parts[0].quant is not None:
                continue
            segs = []
            for p in r.parts:
                if p.name not in expected:
                    log.debug("ignoring packed expert tensor %s", p.name)
                    continue
                full = tuple(expected[p.name].shape)  # [E, ...]
                if e >= full[0]:
                    raise CheckpointError(f"{r.path}: {r.what} is expert {e} but the config has {full[0]} experts")
                _check_shape(r, p.shape, full[1:], part=p.name)
                segs.append(Segment(p.offset, p.nbytes, target(p.name, full)[e].view(-1), r.dtype))
                filled.setdefault(p.name, set()).add(e)
            if segs:
                jobs.append(Job(r, segs))
        for name, seen in filled.items():
            lacking = sorted(set(range(state[name].shape[0])) - seen)
            if lacking:
                raise CheckpointError(
                    f"{self.index_path}: lacks expert {lacking[0]} of {name} ({len(lacking)} missing)")
        jobs += quant_jobs
        jobs.sort(key=lambda j: (j.region.path.name, j.region.offset))
        Pipeline(self.reader, device, threads=threads, chunk_bytes=chunk_bytes, verify=verify).run(jobs)
        return state

    def close(self) -> None:
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_shape(r: Region, got: tuple, want: tuple, part: Optional[str] = None) -> None:
    if tuple(got) != tuple(want):
        of = f" ({part})" if part else ""
        raise CheckpointError(f"{r.path}: {r.what}{of} has shape {list(got)}, expected {list(want)} from config.json")


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True)
