"""Checkpoint readers that show a family's stored expert tensors in moetier's layout.

moetier's routed experts are ``gate_up_proj`` ``[E, 2I, H]`` (gate rows, then up rows) and
``down_proj`` ``[E, H, I]``. gpt-oss and Llama 4 checkpoints store them transposed
(``[E, H, 2I]`` and ``[E, I, H]``), gpt-oss with gate and up interleaved (column ``2j`` gate ``j``,
``2j + 1`` up ``j``, its ``gate_up_proj_bias`` too), and gpt-oss's hub checkpoints as MXFP4:
``*_blocks`` ``[E, rows, cols/32, 16]`` uint8 (two 4-bit e2m1 codes a byte, the low nibble first) and
``*_scales`` ``[E, rows, cols/32]`` uint8 (a power of two, biased by 127, per 32 values), rows and
columns as moetier's. :class:`ExpertsView` wraps a :class:`SafetensorsReader` and serves those
tensors already converted (MXFP4 dequantized, exactly, to bfloat16), under the names and shapes the
model takes, so the loader and ``moetier convert`` read them like any other tensor.

Dequantized is not how they stay: unless another quantization is asked for, loading and converting an
MXFP4 checkpoint quantize its experts by ``kernels.quant.MXFP4_INT8`` (:func:`stored_scheme`), int8
codes in groups of 32 with power-of-two scales, which hold every MXFP4 value exactly (a resident load quantizes
them one expert at a time as it reads them, ``loader.load_model(experts_scheme=)``; a group whose
values are not finite in the run's dtype, i.e. an exponent out of its range, leaves the experts
dequantized, logged: ``models/quantize.py``, ``experts/setup.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from ..errors import CheckpointError

if TYPE_CHECKING:
    from ..kernels.quant import QuantScheme

# e2m1 codes 0..15 (transformers' integrations/mxfp4.py FP4_VALUES)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_FUSED = (".experts.gate_up_proj", ".experts.down_proj")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``blocks`` ``[..., G, 16]`` uint8 and ``scales`` ``[..., G]`` uint8 -> ``[..., G * 32]`` bfloat16, exactly
    (an e2m1 value times a power of two has at most two significant bits). A stack of experts is
    converted one expert at a time, so the temporaries stay a few times one expert's codes."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise CheckpointError(f"MXFP4 blocks {list(blocks.shape)} ({blocks.dtype}) and scales {list(scales.shape)} "
                              f"({scales.dtype}) do not match (want uint8 [..., G, 16] and [..., G])")
    if blocks.dim() > 3:
        out = torch.empty(*blocks.shape[:-2], blocks.shape[-2] * 32, dtype=torch.bfloat16)
        for i in range(blocks.shape[0]):
            out[i] = dequantize_mxfp4(blocks[i], scales[i])
        return out
    lut = torch.tensor(FP4_VALUES, dtype=torch.bfloat16)
    vals = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1)  # [..., G, 16, 2]
    vals = vals.flatten(-2) * torch.exp2(scales.float() - 127.0).to(torch.bfloat16)[..., None]  # [..., G, 32]
    return vals.flatten(-2)


def has_mxfp4_experts(names) -> bool:
    """Whether tensor ``names`` hold the routed experts as MXFP4: ``*.experts.{gate_up,down}_proj_blocks``
    with their ``*_scales``, and none of them in another form."""
    present = set(names)
    blocks = [n for n in present if n.endswith(tuple(f + "_blocks" for f in _FUSED))]
    return (bool(blocks) and all(n.removesuffix("_blocks") + "_scales" in present for n in blocks)
            and not any(n.endswith(_FUSED) for n in present))


def stored_scheme(path) -> Optional["QuantScheme"]:
    """The quantization that keeps the experts of the checkpoint folder ``path`` as they are stored, where
    it has one: :data:`~moetier.kernels.quant.MXFP4_INT8` for MXFP4 experts; None for anything else (a
    packed folder, a GGUF file, float experts)."""
    from ..kernels.quant import MXFP4_INT8
    from .packed import is_packed
    from .safetensors import SafetensorsReader

    path = Path(path)
    if not path.is_dir() or is_packed(path) or not any(path.glob("*.safetensors")):
        return None
    with SafetensorsReader(path) as reader:
        return MXFP4_INT8 if has_mxfp4_experts(reader.names()) else None


def _deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Even entries of ``dim`` (gate), then odd ones (up)."""
    n = t.shape[dim]
    order = torch.cat((torch.arange(0, n, 2), torch.arange(1, n, 2)))
    return t.index_select(dim, order)


class ExpertsView:
    """A reader (the :class:`SafetensorsReader` interface) whose expert tensors are moetier's (module docstring).

    ``transposed``: bf16/fp32 3D experts are stored ``[E, in, out]``; ``interleaved``: gate and up
    alternate (rows of ``gate_up_proj``, entries of ``gate_up_proj_bias``).
    """

    def __init__(self, reader, transposed: bool = True, interleaved: bool = False):
        self.reader, self.transposed, self.interleaved = reader, transposed, interleaved
        names = reader.names()
        present = set(names)
        self._mxfp4: dict[str, tuple[str, str]] = {}  # virtual name -> (blocks, scales)
        self._names: list[str] = []
        for n in names:
            if n.endswith("_scales") and n.removesuffix("_scales") + "_blocks" in present:
                continue
            if n.endswith("_blocks") and n.removesuffix("_blocks") + "_scales" in present:
                base = n.removesuffix("_blocks")
                self._mxfp4[base] = (n, base + "_scales")
                n = base
            self._names.append(n)
        self.files = getattr(reader, "files", [])

    def names(self) -> list[str]:
        return list(self._names)

    @property
    def mxfp4(self) -> bool:
        """Whether some expert tensors are stored as MXFP4."""
        return bool(self._mxfp4)

    def _source(self, name: str) -> str:
        return self._mxfp4[name][0] if name in self._mxfp4 else name

    def file_of(self, name: str) -> Path:
        return self.reader.file_of(self._source(name))

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._mxfp4:
            *lead, g, b = self.reader.shape(self._mxfp4[name][0])
            return (*lead, g * b * 2)
        shape = self.reader.shape(name)
        if self.transposed and name.endswith(_FUSED) and len(shape) == 3:
            return (shape[0], shape[2], shape[1])
        return tuple(shape)

    def dtype(self, name: str) -> str:
        return "BF16" if name in self._mxfp4 else self.reader.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        return self.read(name)

    def get_slice(self, name: str, index: int) -> torch.Tensor:
        return self.read(name, index)

    def read(self, name: str, index: Optional[int] = None) -> torch.Tensor:
        """``name`` (or its ``index``-th expert) converted to moetier's layout."""
        def raw(n: str) -> torch.Tensor:
            return self.reader.read(n) if index is None else self.reader.read(n, index)

        lead = 0 if index is None else -1  # dims before a matrix: [E] or none
        if name in self._mxfp4:
            t = dequantize_mxfp4(*(raw(n) for n in self._mxfp4[name]))
        else:
            t = raw(name)
            if self.transposed and name.endswith(_FUSED) and t.dim() == 3 + lead:
                t = t.transpose(-1, -2).contiguous()
        if self.interleaved and name.endswith(".experts.gate_up_proj"):
            t = _deinterleave(t, -2)
        elif self.interleaved and name.endswith(".experts.gate_up_proj_bias"):
            t = _deinterleave(t, -1)
        return t

    def close(self) -> None:
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
