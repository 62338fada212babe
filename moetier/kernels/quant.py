"""Quantized weights: one representation (:class:`QuantWeight`), quantize and dequantize.

A weight ``w`` ``[N, K]`` (``N`` outputs, ``K`` inputs, as ``nn.Linear.weight``) is cut along ``K``
into groups of ``group_size`` consecutive inputs; each (row, group) has its own scale. Two kinds:

``int8`` (symmetric)
    ``w[n, k] = scales[n, k // G] * codes[n, k]``.
    ``codes``: int8 ``[N, K]`` row-major, values -127..127. ``scales``: ``[N, K // G]``.
    ``G == K`` is per-channel (one scale per row, the fast kernel ``torch._weight_int8pack_mm``);
    ``G == 32`` with float16 scales is exactly GGUF ``Q8_0`` (a block = 32 weights + one fp16 ``d``).

``int4`` (asymmetric, G in 32, 64, 128, 256)
    ``w[n, k] = scale * q[n, k] + offset`` with ``q`` in 0..15 and per-(row, group) ``scale`` and
    ``offset``, held as ``(scale, zero)`` pairs with ``zero = offset + 8 * scale``, i.e.
    ``w = (q - 8) * scale + zero`` (torch's int4 kernel's convention, tested in tests/test_quant.py).
    GGUF ``Q4_0`` (``w = d * (q - 8)``) is ``(d, 0)`` exactly; ``Q4_1`` (``w = d * q + m``) is
    ``(d, m + 8 d)``. ``codes``: uint8 ``[N, K // 2]``, two 4-bit codes a byte, in one of the orders
    of :data:`INT4_LAYOUTS` (``layout``); :func:`pack_int4` / :func:`unpack_int4` convert from / to
    plain ``q`` ``[N, K]``. Build one from plain codes with :func:`int4_from_codes`.

    ``rows`` (moetier's own kernels, ``kernels/native``): row-major, the same on every CPU; each row's
    32-weight blocks are in GGUF Q4_0's byte order (byte ``i`` = ``q[i] | q[i + 16] << 4``), taken 16
    blocks at a time (256 bytes; a last group of ``nbk < 16`` blocks takes ``16 nbk``): byte ``i`` of
    block ``j`` of a group sits at ``4 nbk (i // 4) + 4 j + i % 4``, so one 64-byte load holds 4 bytes of
    each of 16 blocks (one dot-product lane per block). ``scales`` ``[N, K // G, 2]``, row-major.
    The others are the orders ``torch._convert_weight_to_int4pack_for_cpu`` produces (they depend
    on the CPU's vector width), with ``scales`` ``[K // G, N, 2]``, group-major, as that kernel takes them.

``scales.dtype`` is the dtype the kernels compute in (inputs are cast to it and outputs back):
the model's dtype when moetier quantizes, float16 for GGUF blocks carried over as they are.

An ``exact`` int8 scheme (:class:`QuantScheme`) takes power-of-two scales, so weights with few
significant bits in each group are held exactly: MXFP4 (gpt-oss's hub experts: per 32 values an e2m1
code, ``2 x`` one of -12..12, times ``2^(e - 127)``) is int8 group 32 with every value as it was.
Room for more kinds (``mxfp4``, ``fp8``): a new ``kind`` value, its dequantize here and its
kernel in ``kernels/linear.py``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import MoetierError

KINDS = ("int8", "int4")
INT4_GROUPS = (32, 64, 128, 256)
DEFAULT_GROUP = {"int8": None, "int4": 32}  # None: per-channel (one group per row)
# int4 code orders, (block of rows, split): within each full block of ``block`` rows the bytes run
# k-major, [K, block // 2]; "split" puts rows 0..block/2-1 in the low nibbles and the rest in the
# high ones, else rows 2j / 2j+1 share byte j. A last, partial block is always paired. These are the
# orders of torch's CPU kernel on AVX-512 (b64s), AVX2 (b32s) and other CPUs (b32i).
INT4_LAYOUTS = {"b64s": (64, True), "b32s": (32, True), "b32i": (32, False)}
ROW_LAYOUT = "rows"  # moetier's own order (module docstring); not one of torch's
INT4_ORDERS = (ROW_LAYOUT, *INT4_LAYOUTS)


class QuantError(MoetierError, ValueError):
    """A quantization scheme or quantized tensor is not valid as given."""


@dataclass(frozen=True, eq=False)
class QuantWeight:
    """A quantized ``[N, K]`` weight (see the module docstring for each kind's layout)."""

    kind: str
    shape: tuple[int, int]  # (N, K) of the weight it stands for
    group_size: int  # inputs per scale; K for per-channel int8
    codes: torch.Tensor
    scales: torch.Tensor
    layout: str = ""  # int4 only: one of INT4_ORDERS

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the kernels compute in (that of ``scales``)."""
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight ``[N, K]`` in ``dtype`` (default float32), computed in float32."""
        N, K = self.shape
        G = self.group_size
        if self.kind == "int8":
            w = self.codes.float().view(N, K // G, G) * self.scales.float()[..., None]
        elif self.kind == "int4":
            q = unpack_int4(self.codes, self.layout).float().view(N, K // G, G)
            sz = self.scales.float()
            sz = sz if self.layout == ROW_LAYOUT else sz.permute(1, 0, 2)  # [N, K/G, 2]
            w = (q - 8) * sz[..., 0:1] + sz[..., 1:2]
        else:
            raise QuantError(f"unknown quantization kind {self.kind!r}")
        return w.reshape(N, K).to(dtype or torch.float32)

    def __repr__(self) -> str:
        return (f"QuantWeight({self.kind}, shape={list(self.shape)}, group_size={self.group_size}, "
                f"scales={str(self.dtype).removeprefix('torch.')}{', ' + self.layout if self.layout else ''})")


@dataclass(frozen=True)
class QuantScheme:
    """How to quantize: ``kind`` and ``group_size`` (None: int8 per-channel / int4's default).

    ``exact`` (int8 only): each group's scale is the power of two that puts its largest magnitude in
    64..127 (or the scale dtype's smallest power of two), and quantizing fails (QuantError) unless
    every code is then exact: for weights that are already few-bit values times a power of two per
    group (:data:`MXFP4_INT8`), it keeps them as they are instead of rounding them again."""

    kind: str
    group_size: Optional[int] = None
    exact: bool = False

    def group_for(self, K: int, what: str = "weight") -> int:
        """The group size for a weight with ``K`` inputs; an error if it does not fit."""
        G = self.group_size or DEFAULT_GROUP[self.kind] or K
        if K % G:
            raise QuantError(f"group size {G} does not divide the input dimension {K} of {what}")
        if self.kind == "int4" and G not in INT4_GROUPS:
            raise QuantError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUPS))}, got {G}")
        return G

    def spec(self, shape: tuple[int, int], dtype: torch.dtype, what: str = "weight") -> "QuantSpec":
        N, K = shape
        return QuantSpec(self.kind, (N, K), self.group_for(K, what), dtype,
                         machine_int4_layout() if self.kind == "int4" else "")


def parse_scheme(kind: Optional[str], group_size: Optional[int] = None) -> Optional[QuantScheme]:
    """``"int8"``/``"int4"`` (+ group size) -> QuantScheme; ``None``/``"none"`` -> None."""
    if kind is None or kind == "none":
        if group_size is not None:
            raise QuantError("a group size needs a quantization kind (int8 or int4)")
        return None
    if kind not in KINDS:
        raise QuantError(f"quantization {kind!r} is not supported; use one of: {', '.join(KINDS)}, none")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise QuantError(f"group size must be a positive integer, got {group_size!r}")
        if kind == "int4" and group_size not in INT4_GROUPS:
            raise QuantError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUPS))}, got {group_size}")
    return QuantScheme(kind, group_size)


@dataclass(frozen=True)
class QuantSpec:
    """Everything about a quantized weight but its values: enough to lay it out in bytes and view it.

    A weight's bytes are its codes, then (from ``scales_offset``, a multiple of ``align``) its scales.
    """

    kind: str
    shape: tuple[int, int]
    group_size: int
    dtype: torch.dtype  # of the scales
    layout: str = ""

    @property
    def codes_shape(self) -> tuple[int, int]:
        N, K = self.shape
        return (N, K // 2) if self.kind == "int4" else (N, K)

    @property
    def codes_dtype(self) -> torch.dtype:
        return torch.uint8 if self.kind == "int4" else torch.int8

    @property
    def scales_shape(self) -> tuple[int, ...]:
        N, K = self.shape
        if self.kind != "int4":
            return (N, K // self.group_size)
        return (N, K // self.group_size, 2) if self.layout == ROW_LAYOUT else (K // self.group_size, N, 2)

    def scales_offset(self, align: int) -> int:
        return -(-math.prod(self.codes_shape) // align) * align

    def nbytes(self, align: int) -> int:
        return self.scales_offset(align) + math.prod(self.scales_shape) * self.dtype.itemsize

    def view(self, buf: torch.Tensor, align: int) -> QuantWeight:
        """A QuantWeight viewing uint8 ``buf`` (codes at 0, scales at ``scales_offset``)."""
        n_codes = math.prod(self.codes_shape)
        s0 = self.scales_offset(align)
        n_scales = math.prod(self.scales_shape) * self.dtype.itemsize
        codes = buf[:n_codes].view(self.codes_dtype).view(self.codes_shape)
        scales = buf[s0 : s0 + n_scales].view(self.dtype).view(self.scales_shape)
        return QuantWeight(self.kind, self.shape, self.group_size, codes, scales, self.layout)

    def write(self, qw: QuantWeight, buf: torch.Tensor, align: int) -> None:
        """Copy ``qw`` (of this spec) into uint8 ``buf`` (zeros between codes and scales stay as they are)."""
        view = self.view(buf, align)
        view.codes.copy_(qw.codes)
        view.scales.copy_(qw.scales)

    def to_json(self) -> dict:
        d = {"kind": self.kind, "group_size": self.group_size, "scales_dtype": str(self.dtype).removeprefix("torch.")}
        if self.layout:
            d["layout"] = self.layout
        return d


def spec_of(qw: QuantWeight) -> QuantSpec:
    return QuantSpec(qw.kind, tuple(qw.shape), qw.group_size, qw.dtype, qw.layout)


def quantize(w: torch.Tensor, scheme: QuantScheme, dtype: Optional[torch.dtype] = None,
             layout: Optional[str] = None, what: str = "weight") -> QuantWeight:
    """Quantize ``w`` ``[N, K]`` by ``scheme``; scales in ``dtype`` (default ``w``'s, float32 if not float).

    int8: ``scale = max|w| / 127`` per group, ``q = round(w / scale)``. int4: ``scale = (max - min) / 15``,
    ``q = round((w - zero) / scale) + 8`` clamped to 0..15, with the scale and zero rounded to ``dtype``
    first, so the codes are the nearest for the parameters as stored. Error bound per element:
    half a step (``scale / 2``) plus the rounding of the parameters.
    """
    if w.dim() != 2:
        raise QuantError(f"{what}: can only quantize 2D weights, got shape {list(w.shape)}")
    N, K = w.shape
    G = scheme.group_for(K, what)
    dtype = dtype or (w.dtype if w.dtype.is_floating_point else torch.float32)
    wg = w.detach().float().reshape(N, K // G, G)
    if scheme.kind == "int8" and scheme.exact:
        q, scale = _exact_int8(wg, dtype, what)
        return QuantWeight("int8", (N, K), G, q.reshape(N, K), scale)
    if scheme.kind == "int8":
        scale = (wg.abs().amax(dim=-1) / 127).to(dtype)  # [N, K/G]
        s = scale.float()[..., None]
        # an all-zero group has scale 0: divide by 1 there (its codes are 0 either way)
        q = (wg / torch.where(s > 0, s, 1)).round_().clamp_(-127, 127).to(torch.int8)
        return QuantWeight("int8", (N, K), G, q.reshape(N, K), scale)
    if scheme.kind == "int4":
        if N % 2:
            raise QuantError(f"{what}: int4 needs an even number of rows, got {N}")
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # [N, K/G]
        scale = ((hi - lo) / 15).to(dtype)
        zero = (lo + 8 * scale.float()).to(dtype)
        s, z = scale.float()[..., None], zero.float()[..., None]
        # a constant group has scale 0 and w - zero = 0 (zero = min): code 8, dequantized to zero = w
        q = (wg - z).div_(torch.where(s > 0, s, 1)).round_().add_(8).clamp_(0, 15)
        layout = layout or machine_int4_layout()
        codes = pack_int4(q.reshape(N, K).to(torch.uint8), layout)
        return QuantWeight("int4", (N, K), G, codes, _pairs(scale, zero, layout), layout)
    raise QuantError(f"unknown quantization kind {scheme.kind!r}")


def _exact_int8(wg: torch.Tensor, dtype: torch.dtype, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 groups ``[N, K/G, G]`` -> (int8 codes, power-of-two scales in ``dtype``), exactly, or a QuantError.
    ``max|w| = m 2^e`` (``m`` in [0.5, 1)) gives the scale ``2^(e - 7)``, raised to ``dtype``'s smallest
    power of two (every value of ``dtype`` is a multiple of it); dividing by a power of two is exact."""
    if not bool(torch.isfinite(wg).all()):
        raise QuantError(f"{what}: holds infinite or NaN values, which int8 codes cannot")
    _, e = torch.frexp(wg.abs().amax(dim=-1))
    info = torch.finfo(dtype)
    k = (e - 7).clamp_(min=round(math.log2(info.tiny * info.eps)))
    scale = torch.exp2(k.double()).float()  # powers of two, down to float32's smallest: exact
    q = wg / scale[..., None]
    if not torch.equal(q, q.round()) or bool((q.abs() > 127).any()):
        raise QuantError(f"{what}: not exactly int8 codes times a power of two in every group of {wg.shape[-1]}")
    return q.to(torch.int8), scale.to(dtype)


MXFP4_INT8 = QuantScheme("int8", 32, exact=True)  # MXFP4 blocks of 32, exactly (module docstring)


def int4_from_codes(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                    layout: Optional[str] = None) -> QuantWeight:
    """An int4 QuantWeight from plain codes ``q`` ``[N, K]`` (0..15) and per-group ``scale``, ``offset``
    ``[N, K // G]`` (``w = scale * q + offset``; GGUF Q4_0: ``offset = -8 * d``). The scales' dtype is
    ``scale``'s; ``zero = offset + 8 * scale`` is computed in float32 and rounded to it once."""
    N, K = q.shape
    G = K // scale.shape[1]
    if scale.shape != (N, K // G) or offset.shape != scale.shape or K % G or G not in INT4_GROUPS:
        raise QuantError(f"int4 codes {list(q.shape)} with scales {list(scale.shape)}: not a supported grouping")
    zero = (offset.float() + 8 * scale.float()).to(scale.dtype)
    layout = layout or machine_int4_layout()
    return QuantWeight("int4", (N, K), G, pack_int4(q.to(torch.uint8), layout), _pairs(scale, zero, layout), layout)


def _pairs(scale: torch.Tensor, zero: torch.Tensor, layout: str) -> torch.Tensor:
    """``(scale, zero)`` ``[N, K/G]`` each -> the int4 scales tensor of ``layout``."""
    sz = torch.stack([scale, zero], dim=-1)  # [N, K/G, 2]
    return sz.contiguous() if layout == ROW_LAYOUT else sz.permute(1, 0, 2).contiguous()  # [K/G, N, 2]


def to_layout(w: QuantWeight, layout: str) -> QuantWeight:
    """An int4 weight with the same values in another code order (the same object if already in it)."""
    if w.kind != "int4" or w.layout == layout:
        return w
    sz = w.scales if w.layout == ROW_LAYOUT else w.scales.permute(1, 0, 2)  # [N, K/G, 2]
    codes = pack_int4(unpack_int4(w.codes, w.layout), layout)
    return QuantWeight("int4", w.shape, w.group_size, codes, _pairs(sz[..., 0], sz[..., 1], layout), layout)


def int8_from_codes(q: torch.Tensor, scale: torch.Tensor) -> QuantWeight:
    """An int8 QuantWeight from codes ``q`` int8 ``[N, K]`` and ``scale`` ``[N, K // G]`` (GGUF Q8_0: G = 32,
    fp16 ``d``)."""
    N, K = q.shape
    if scale.dim() != 2 or scale.shape[0] != N or K % scale.shape[1]:
        raise QuantError(f"int8 codes {list(q.shape)} with scales {list(scale.shape)}: not a supported grouping")
    return QuantWeight("int8", (N, K), K // scale.shape[1], q.to(torch.int8).contiguous(), scale.contiguous())


def pack_int4(q: torch.Tensor, layout: str) -> torch.Tensor:
    """Plain codes ``q`` uint8 ``[N, K]`` (0..15) -> ``[N, K // 2]`` bytes in ``layout``'s order."""
    N, K = q.shape
    q = q.to(torch.uint8)
    if layout == ROW_LAYOUT:
        b = q.reshape(N, K // 32, 2, 16)
        return _interleave((b[:, :, 0] | (b[:, :, 1] << 4)).reshape(N, K // 32, 4, 4), forward=True)
    block, split = INT4_LAYOUTS[layout]
    full = (N // block) * block if split else 0
    parts = []
    if full:
        b = q[:full].view(N // block, 2, block // 2, K)  # [NB, lo/hi half, rows, K]
        parts.append((b[:, 0] | (b[:, 1] << 4)).transpose(1, 2).reshape(-1))  # [NB, K, block/2]
    for i in range(full, N, block):  # paired rows, k-major within each block
        b = q[i : i + block]
        parts.append((b[0::2] | (b[1::2] << 4)).T.reshape(-1))
    return torch.cat(parts).view(N, K // 2) if parts else q.new_empty((0, K // 2))


def unpack_int4(codes: torch.Tensor, layout: str) -> torch.Tensor:
    """``[N, K // 2]`` bytes in ``layout``'s order -> plain codes uint8 ``[N, K]``."""
    N, K = codes.shape[0], codes.shape[1] * 2
    if layout == ROW_LAYOUT:
        b = _interleave(codes, forward=False).reshape(N, K // 32, 1, 16)  # GGUF-order bytes of each block
        return torch.cat([b & 15, b >> 4], dim=2).reshape(N, K)
    block, split = INT4_LAYOUTS[layout]
    flat = codes.reshape(-1)
    full = (N // block) * block if split else 0
    parts = []
    if full:
        b = flat[: full * K // 2].view(N // block, K, block // 2)
        parts.append(torch.cat([b & 15, b >> 4], dim=2).transpose(1, 2).reshape(full, K))
    for i in range(full, N, block):
        nb = min(block, N - i)
        b = flat[i * K // 2 : (i + nb) * K // 2].view(K, nb // 2)
        parts.append(torch.stack([b & 15, b >> 4], dim=2).view(K, nb).T)
    return torch.cat(parts) if parts else codes.new_empty((0, K))


def _interleave(t: torch.Tensor, forward: bool) -> torch.Tensor:
    """``rows`` order: GGUF-order block bytes ``[N, nb, 4, 4]`` (block, slice, byte) -> ``[N, nb * 16]`` with 16 blocks'
    slices interleaved (``forward``), or the inverse from ``[N, nb * 16]`` to ``[N, nb, 16]``."""
    N = t.shape[0]
    nb = t.shape[1] if forward else t.shape[1] // 16
    full = nb // 16 * 16
    parts = []
    for b0, nbk in [(g, 16) for g in range(0, full, 16)] + ([(full, nb - full)] if nb > full else []):
        if forward:
            parts.append(t[:, b0 : b0 + nbk].transpose(1, 2).reshape(N, 16 * nbk))  # [N, slice, block, byte]
        else:
            part = t[:, 16 * b0 : 16 * (b0 + nbk)].reshape(N, 4, nbk, 4).transpose(1, 2)  # [N, block, slice, byte]
            parts.append(part.reshape(N, nbk, 16))
    return torch.cat(parts, dim=1).contiguous()


def machine_int4_layout() -> str:
    """The int4 code order to quantize into here: ``rows`` where moetier's own int4 kernel runs (it needs
    K a multiple of 32, as every int4 group size is), else torch's kernel's
    (:func:`int4_kernel_layout`), else ``b64s``."""
    from .native import kinds

    if "int4" in kinds():
        return ROW_LAYOUT
    return int4_kernel_layout() or "b64s"


@functools.lru_cache(maxsize=None)
def int4_kernel_layout() -> Optional[str]:
    """The layout the int4 kernel reads here, or None when no known layout matches it."""
    try:
        q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    except (RuntimeError, AttributeError):
        return None
    return next((n for n in INT4_LAYOUTS if torch.equal(pack_int4(q.to(torch.uint8), n), packed)), None)
