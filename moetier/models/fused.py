"""Decode tokens through a decoder layer in three native calls (``kernels/native``) instead of ~40 ops.

At batch 1 a layer's weights are read in a few milliseconds at most (int4: well under one), while
the unfused layer costs some 40 torch ops of a few microseconds each: norm, three projections,
rotary, the KV write, attention, output projection, norm, router, softmax, top-k, experts, sums.
:class:`FusedLayer` runs the same math as three calls into ``gemv.c``:

* ``mt_attn``: RMSNorm, q/k/v projections (+ bias, + per-head q/k norm), rotary, the KV write into
  the sequence's cache buffers, attention over the cache (sliding window too), output projection and
  the residual add;
* ``mt_route``: RMSNorm and the softmax top-k router;
* the routed experts through :meth:`ExpertsBase.forward` (resident: one ``mt_moe`` call; offloaded:
  the store fetches the chosen experts first, as for any step), then the shared expert if any.

Every intermediate is rounded to bf16 where the unfused bf16 path rounds, and the projections use
the same few-row kernels the unfused path uses at one row, so the two agree to within the
summation order of norms and attention. A step takes this path when it is one bf16 decode token of
each sequence, no more of them than the rows at which every weight still takes the native kernels
(``max_batch``); the projections and the experts then run on all the rows at once and attention on
each sequence's own cache, and every kernel computes each row by itself, so a row gets the bits it
gets alone. The weights must be ones the native kernels read (plain bf16, int8, int4 ``rows``), families whose
attention is plain GQA (optionally with q/k/v bias and per-head q/k norm) and whose MoE router is a
softmax top-k; anything else keeps the unfused path. ``MOETIER_FUSED=0`` turns it off.

When every layer has this path, its experts are resident and there is no shared expert,
:class:`FusedToken` runs the three calls of every layer in one (``mt_decode``), with no return to
Python in between: the same calls on the same buffers, so the same numbers bit for bit.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

import torch
from torch import nn

from ..kernels import native
from ..kernels.linear import has_native, native_kind, native_rows
from .decoder import DecoderLayer
from .layers import Attention, RMSNorm
from . import moe  # moe.fused_ok looked up at each use, as tests patch it
from .moe import Experts, SoftmaxTopKRouter, SparseMoeBlock
from .prepack import DispatchedLinear

ENV = "MOETIER_FUSED"


class AttnDesc(ctypes.Structure):
    """gemv.c's ``attn_desc``."""

    _fields_ = [("q", native.WDesc), ("k", native.WDesc), ("v", native.WDesc), ("o", native.WDesc),
                ("q_bias", ctypes.c_void_p), ("k_bias", ctypes.c_void_p), ("v_bias", ctypes.c_void_p),
                ("o_bias", ctypes.c_void_p), ("norm", ctypes.c_void_p), ("q_norm", ctypes.c_void_p),
                ("k_norm", ctypes.c_void_p), ("eps", ctypes.c_float), ("head_eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("hq", ctypes.c_int64), ("hk", ctypes.c_int64), ("d", ctypes.c_int64),
                ("window", ctypes.c_int64)]


class LayerDesc(ctypes.Structure):
    """gemv.c's ``layer_desc``: a fused layer whose experts are all resident."""

    _fields_ = [("attn", AttnDesc), ("post_norm", ctypes.c_void_p), ("post_eps", ctypes.c_float),
                ("top_k", ctypes.c_int32), ("normalize", ctypes.c_int32), ("router", native.WDesc),
                ("experts", ctypes.c_void_p)]


def _signatures(so) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    so.mt_attn1.argtypes = [p, p, i64, p, p, p, p, i64, i32]
    so.mt_route1.argtypes = [p, i64, p, f32, p, i32, i32, p, p, p, i32]
    so.mt_decode1.argtypes = [p, i32, p, i64, p, p, p, p, p, i32]
    so.mt_decode.argtypes = [p, i32, i64, p, p, p, p, p, p, p, i32]
    so.mt_attn.argtypes = [p, i64, p, p, p, p, p, p, p, i32]
    so.mt_route.argtypes = [p, i64, i64, p, f32, p, i32, i32, p, p, p, i32]
    for f in (so.mt_attn1, so.mt_route1, so.mt_decode1, so.mt_decode, so.mt_attn, so.mt_route):
        f.restype = i32


def _weight(m: nn.Module):
    """The weight a projection module multiplies by, if the native kernels read it at one row; else None."""
    w = m.qweight if hasattr(m, "qweight") else (m.weight if type(m) in (nn.Linear, DispatchedLinear) else None)
    if w is None or not has_native(w):
        return None
    return w if native_rows(native_kind(w), torch.get_num_threads()) > 1 else None


def _bf16_ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    if t is None:
        return None
    if t.dtype != torch.bfloat16 or not t.is_contiguous() or not t.is_cpu:
        raise ValueError("not a contiguous bf16 CPU tensor")
    return t.data_ptr()


class FusedLayer:
    """The fused decode path of one :class:`~moetier.models.decoder.DecoderLayer` (module docstring)."""

    def __init__(self, layer: nn.Module, index: int):
        attn, mlp = layer.self_attn, layer.mlp
        self.layer, self.index, self.attn, self.mlp = layer, index, attn, mlp
        ws = [_weight(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        router = _weight_plain(mlp.gate)
        if any(w is None for w in ws) or router is None:
            raise ValueError("a weight the native kernels do not read")
        self._keep = ws + [router]  # the descriptors hold raw pointers: keep the tensors alive
        head = attn.qk_norm == "head"
        self.desc = AttnDesc(
            *[native.wdesc(w) for w in ws],
            *[_bf16_ptr(getattr(attn, n).bias) for n in ("q_proj", "k_proj", "v_proj", "o_proj")],
            _bf16_ptr(layer.input_layernorm.weight),
            _bf16_ptr(attn.q_norm.weight) if head else None, _bf16_ptr(attn.k_norm.weight) if head else None,
            layer.input_layernorm.eps, attn.q_norm.eps if head else 0.0, attn.scale,
            attn.hq, attn.hk, attn.d, attn.window or 0)
        self.router = native.wdesc(router)
        self.post_norm = layer.post_attention_layernorm
        _bf16_ptr(self.post_norm.weight)
        H, k = attn.q_proj.in_features, mlp.gate.top_k
        self.H, self.k = H, k
        self.max_batch = _max_batch(self._keep)
        self.part = torch.empty((attn.hk, 1, attn.d), dtype=torch.bfloat16, device="meta")  # a KV part's shape

    def __call__(self, x: torch.Tensor, batch) -> torch.Tensor:
        """One decode token of each of the batch's sequences (``x`` ``[B, H]``, row b of sequence b)."""
        so, threads, B = native.lib(), torch.get_num_threads(), x.shape[0]
        args = _step_args(batch, self.attn.rotary, [self.index], [self.part])
        x = x.contiguous()  # written in place: x is the previous layer's fresh output
        if so.mt_attn(ctypes.byref(self.desc), B, x.data_ptr(), *args, threads):
            raise RuntimeError(f"fused attention refused layer {self.index} at positions {batch.starts}")
        mlp = self.mlp
        xn = torch.empty(B, self.H, dtype=torch.bfloat16)
        ids, weights = torch.empty(B, self.k, dtype=torch.int64), torch.empty(B, self.k, dtype=torch.float32)
        if so.mt_route(x.data_ptr(), B, self.H, self.post_norm.weight.data_ptr(), self.post_norm.eps,
                       ctypes.byref(self.router), self.k, mlp.gate.normalize, xn.data_ptr(), ids.data_ptr(),
                       weights.data_ptr(), threads):
            raise RuntimeError(f"fused routing refused layer {self.index}")
        out = mlp.experts(xn, ids, weights)
        if mlp.shared_expert is not None:
            shared = mlp.shared_expert(xn)
            if mlp.shared_expert_gate is not None:
                shared = torch.sigmoid(mlp.shared_expert_gate(xn)) * shared
            out = out + shared
        return x + out


def _max_batch(weights) -> int:
    """The most decode rows at which every one of ``weights`` still takes the native kernel."""
    threads = torch.get_num_threads()
    return min(native_rows(native_kind(w), threads) for w in weights) - 1


def _step_args(batch, rotary, layers: list[int], parts: list) -> tuple:
    """``mt_attn`` / ``mt_decode``'s per-sequence arguments for a step of one decode token per sequence: positions,
    rotary rows, and the cache buffers of ``layers`` (layer-major: entry ``i B + b`` is layer i's of sequence b),
    each reserved one position further."""
    B, n = len(batch.caches), len(layers)
    kb, vb, cap = (ctypes.c_void_p * (n * B))(), (ctypes.c_void_p * (n * B))(), (ctypes.c_int64 * (n * B))()
    for b, (cache, pos) in enumerate(zip(batch.caches, batch.starts)):
        for i, (layer, part) in enumerate(zip(layers, parts)):
            k, v = cache.reserve(layer, pos + 1, (part, part))
            kb[i * B + b], vb[i * B + b], cap[i * B + b] = k.data_ptr(), v.data_ptr(), k.shape[1]
    cos, sin = rotary._table(max(batch.starts) + 1, torch.device("cpu"))
    row = cos.shape[1] * 4
    cosr = (ctypes.c_void_p * B)(*[cos.data_ptr() + p * row for p in batch.starts])
    sinr = (ctypes.c_void_p * B)(*[sin.data_ptr() + p * row for p in batch.starts])
    return (ctypes.c_int64 * B)(*batch.starts), cosr, sinr, kb, vb, cap


class FusedToken:
    """A decode token of each sequence of a step through every layer in one native call (``mt_decode``).

    Taken when every layer has a :class:`FusedLayer`, every layer's experts are resident and read by the
    native kernels, no layer has a shared expert, and all layers share one rotary table: the per-layer
    path's calls, in the same order on the same buffers, without returning to Python between them."""

    def __init__(self, fused: list[FusedLayer]):
        self.layers = fused
        self.rotary = fused[0].attn.rotary
        if any(f.attn.rotary._key != self.rotary._key for f in fused):
            raise ValueError("layers with different rotary settings")
        n = len(fused)
        self.experts = [_resident_experts(f.mlp, f.H) for f in fused]
        self.descs = (LayerDesc * n)(*[
            LayerDesc(f.desc, f.post_norm.weight.data_ptr(), f.post_norm.eps, f.k, f.mlp.gate.normalize, f.router,
                      ctypes.addressof(ex)) for f, ex in zip(fused, self.experts)])
        # a batch of decode tokens runs in one call while every weight still takes the native kernel at that many
        # rows (so do the experts: each sees every row at most once)
        self.max_batch = _max_batch([w for f in fused for w in f._keep] +
                                    [w for ex in self.experts for pair in ex._keep for w in pair])

    def __call__(self, x: torch.Tensor, batch) -> torch.Tensor:
        """One decode token of each of the batch's sequences (``x`` ``[B, H]``, row b of sequence b) through every
        layer: the per-layer path's calls in one, so its bits; and row b's bits are those it gets decoded alone."""
        n = len(self.layers)
        args = _step_args(batch, self.rotary, list(range(n)), [f.part for f in self.layers])
        x = x.contiguous()  # written in place: the embedding's fresh output
        if native.lib().mt_decode(self.descs, n, x.shape[0], x.data_ptr(), *args, torch.get_num_threads()):
            raise RuntimeError(f"fused decode refused {x.shape[0]} tokens at positions {batch.starts}")
        return x


def _resident_experts(mlp: SparseMoeBlock, H: int):
    """A layer's experts as a ctypes array of descriptors, if all are resident and native; else ValueError."""
    experts = mlp.experts
    if type(experts) is not Experts or mlp.shared_expert is not None:
        raise ValueError("offloaded experts or a shared expert")
    pairs = [experts.weights(e) for e in range(experts.num_experts)]
    probe = torch.empty(1, H, dtype=torch.bfloat16)
    if not moe.fused_ok(probe, pairs):
        raise ValueError("an expert weight the native kernels do not read")
    arr = (native.Expert * len(pairs))(*[native.Expert(native.wdesc(gu), native.wdesc(dn)) for gu, dn in pairs])
    arr._keep = pairs  # the descriptors hold raw pointers
    return arr


def _weight_plain(gate: nn.Module):
    """The router's weight if the native bf16 kernel reads it (routers stay in 16 bits)."""
    w = gate.weight
    return w if has_native(w) and native_rows("bf16", torch.get_num_threads()) > 1 else None


def eligible(layer: nn.Module) -> bool:
    """Whether a decoder layer's structure is one the fused path computes (module docstring)."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if type(layer) is not DecoderLayer:  # a subclass changes the layer's math (Granite's residual multiplier)
        return False
    if type(attn) is not Attention or not isinstance(mlp, SparseMoeBlock) or type(mlp.gate) is not SoftmaxTopKRouter:
        return False
    if attn.qk_norm not in (None, "head") or attn.clip_qkv is not None or attn.rotary.interleaved:
        return False
    if attn.rotary.dim != attn.d:  # partial rotary: mt_attn1 rotates whole heads
        return False
    if mlp.scaling != 1.0 or attn.d > 512 or attn.d % 2:
        return False
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    if attn.qk_norm == "head":
        norms += [attn.q_norm, attn.k_norm]
    return all(type(n) is RMSNorm and n.weight.dtype == torch.bfloat16 and n.weight.is_cpu for n in norms)


def install(model: nn.Module) -> int:
    """Give every eligible decoder layer of ``model`` its fused decode path; returns how many got one."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or os.environ.get(ENV, "").strip() == "0" or native.lib() is None:
        return 0
    _signatures(native.lib())
    n = 0
    for i, layer in enumerate(layers):
        layer.fused = None
        if eligible(layer):
            try:
                layer.fused = FusedLayer(layer, i)
                n += 1
            except ValueError:
                pass
    model.fused_token = None
    if n == len(layers) and n:
        try:
            model.fused_token = FusedToken([layer.fused for layer in layers])
        except ValueError:
            pass
    return n
