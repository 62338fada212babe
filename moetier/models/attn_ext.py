"""Attention variants of the newer families, on top of :class:`~moetier.models.layers.Attention`.

* ``sinks`` (gpt-oss): one learned logit per head joins every query's softmax and takes its share of
  the probability mass, attending to nothing.
* ``window`` with a bounded cache (gpt-oss's sliding layers): the layer's keys and values live in a
  ring of ``window`` positions (:meth:`SeqKV.write_window`), so a sequence's SWA layers never hold more.
* ``chunk`` (Llama 4's ``attention_chunk_size``): a query sees the keys of its own chunk only, and the
  layer's cache is a ring of one chunk (:meth:`SeqKV.write_chunked`).
* ``rope=False`` (Llama 4's NoPE layers), optionally with attention temperature tuning: queries scaled
  by ``1 + attn_scale * log1p(floor((pos + 1) / floor_scale))``.
* ``l2_qk_norm`` (Llama 4's RoPE layers): q and k RMS-normalised per head, without a weight, after rotary.

Attention runs sequence by sequence (no padded decode group): shapes as in ``layers.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.batch import ForwardBatch
from .args import BaseModelArgs
from .layers import Attention, Rotary

_SCORES = 1 << 24  # score elements per block of queries in the sinks path (64 MiB of float32)


def attend_ext(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, first: int | None, scale: float,
    window: int | None = None, chunk: int | None = None, sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of one sequence's queries ``q`` ``[hq, n, d]`` (positions ``start..``) on keys
    ``k`` ``[hk, M, d]`` / values ``[hk, M, dv]`` at positions ``first..first+M-1`` (``first`` None: one
    query, and every key visible to it, in any order). Returns ``[n, hq * dv]``."""
    hq, n, d = q.shape
    hk, M, dv = v.shape
    g = hq // hk
    if first is not None and chunk:  # keys before the first query's chunk are outside every query's chunk
        lo = max(0, (start // chunk) * chunk - first)
        if lo:
            k, v, first, M = k[:, lo:], v[:, lo:], first + lo, M - lo
    mask = None
    if first is not None and n > 1:
        qpos = torch.arange(start, start + n, device=q.device)
        kpos = torch.arange(first, first + M, device=q.device)[None, :]
        mask = kpos <= qpos[:, None]  # [n, M]
        if window:
            mask &= kpos > qpos[:, None] - window
        if chunk:
            mask &= kpos // chunk == qpos[:, None] // chunk
    if sinks is None:
        qg = q.reshape(hk, g * n, d)
        m = None if mask is None else mask.repeat(g, 1)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=m, scale=scale)
        return out.view(hq, n, dv).transpose(0, 1).reshape(n, hq * dv)
    out = q.new_empty(hq, n, dv)
    q4 = q.view(hk, g, n, d)
    sink = sinks.float().view(hk, g, 1, 1)
    step = max(1, _SCORES // max(1, hq * M))
    for a in range(0, n, step):
        b = min(n, a + step)
        s = torch.matmul(q4[:, :, a:b], k[:, None].transpose(-1, -2)).float() * scale  # [hk, g, b-a, M]
        if mask is not None:
            s = s.masked_fill(~mask[a:b], float("-inf"))
        both = torch.cat((s, sink.expand(hk, g, b - a, 1)), dim=-1)
        p = torch.softmax(both - both.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]  # the sink's share dropped
        out[:, a:b] = torch.matmul(p.to(v.dtype), v[:, None]).view(hq, b - a, dv)
    return out.transpose(0, 1).reshape(n, hq * dv)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama 4's weightless RMS norm over the last dim, in float32."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class ExtAttention(Attention):
    """:class:`Attention` with the options of the module docstring (all off: plain GQA attention)."""

    def __init__(
        self, args: BaseModelArgs, layer: int, *, qkv_bias: bool = False, sinks: bool = False,
        window: int | None = None, chunk: int | None = None, rope: bool = True, interleaved_rope: bool = False,
        l2_qk_norm: bool = False, temperature: tuple[float, float] | None = None,
    ):
        super().__init__(args, layer, qkv_bias=qkv_bias)
        self.window = None  # attend_batch's window is not used: see ring
        self.ring = window
        self.chunk = chunk
        self.sinks = nn.Parameter(torch.empty(self.hq)) if sinks else None
        if not rope:
            self.rotary = None
        elif interleaved_rope:
            self.rotary = Rotary(self.d, args.rope, args.max_position_embeddings, interleaved=True)
        self.l2_eps = args.rms_norm_eps if l2_qk_norm else None
        self.temperature = temperature  # (floor_scale, attn_scale) or None

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.hq, self.d)
        k = self.k_proj(x).view(T, self.hk, self.d)
        v = self.v_proj(x).view(T, self.hk, self.d)
        if self.rotary is not None:
            q, k = self.rotary(q, batch.positions), self.rotary(k, batch.positions)
        if self.l2_eps is not None:
            q, k = l2_norm(q, self.l2_eps), l2_norm(k, self.l2_eps)
        if self.temperature is not None:
            floor_scale, attn_scale = self.temperature
            pos = batch.positions.to(q.device).float()
            scales = torch.log1p(torch.floor((pos + 1.0) / floor_scale)) * attn_scale + 1.0
            q = (q * scales[:, None, None]).to(q.dtype)
        out = q.new_empty(T, self.hq * self.d)
        for i, cache in enumerate(batch.caches):
            a, b, start = batch.offsets[i], batch.offsets[i + 1], batch.starts[i]
            kk, vv = k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)  # [hk, n, d]
            if self.ring:
                (kk, vv), first = cache.write_window(self.layer, start, self.ring, kk, vv)
            elif self.chunk:
                (kk, vv), first = cache.write_chunked(self.layer, start, self.chunk, kk, vv)
            else:
                kk, vv = cache.write(self.layer, start, kk, vv)
                first = 0
            out[a:b] = attend_ext(q[a:b].transpose(0, 1), kk, vv, start, first, self.scale, self.ring, self.chunk,
                                  self.sinks)
        return self.o_proj(out)
