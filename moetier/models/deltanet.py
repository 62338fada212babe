"""Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5): a fixed-size state per sequence.

Per layer and sequence the cache is a state, not keys and values (``runtime/cache_spec.py``):

- the causal depthwise conv's window, the last ``K - 1`` inputs ``[conv_dim, K - 1]`` (run dtype);
- the recurrent state ``S`` ``[hv, dk, dv]`` (float32, as transformers keeps it).

A prompt (or a chunk of one) runs the chunked gated delta rule (:func:`chunk_rule`), a decode
token the recurrent step (:func:`recurrent_step`), all decoding sequences of a step in one call.
Both follow transformers' torch forms (``torch_chunk_gated_delta_rule`` /
``torch_recurrent_gated_delta_rule``), which the tests hold them to.
Shapes: ``T`` tokens, ``hk``/``hv`` key/value heads, ``dk``/``dv`` their dims, ``C`` conv channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.batch import ForwardBatch
from ..runtime.cache_spec import LayerCache, state
from .layers import GatedRMSNorm


def cache_of(hk: int, hv: int, dk: int, dv: int, K: int, dtype: torch.dtype) -> LayerCache:
    """A layer's state per sequence: the conv window ``[C, K - 1]`` (run dtype) and ``S`` ``[hv, dk, dv]``
    (float32); per token its update takes the conv's ``K`` multiply-adds per channel and, per value head,
    the delta rule's decay, ``k S``, rank-1 update and ``q S`` (about 8 ``dk dv`` FLOPs)."""
    conv = 2 * hk * dk + hv * dv
    return state(((conv, K - 1), dtype), ((hv, dk, dv), torch.float32), flops_per_token=2 * K * conv + 8 * hv * dk * dv)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def causal_conv(xin: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv + silu: ``xin`` ``[..., C, K - 1 + n]`` (the window, then ``n`` new inputs),
    ``w`` ``[C, 1, K]`` -> ``[..., C, n]`` in ``xin``'s dtype. ``K`` multiply-adds in float32 (as a
    float32-accumulating conv1d), rounded once: oneDNN's bf16 depthwise conv1d is some 100x slower."""
    K = w.shape[-1]
    n = xin.shape[-1] - K + 1
    wf = w[:, 0].float()
    acc = xin[..., :n].float() * wf[:, :1]
    for k in range(1, K):
        acc.addcmul_(xin[..., k : k + n].float(), wf[:, k : k + 1])
    return F.silu(acc.to(xin.dtype))


def chunk_rule(q, k, v, g, beta, S=None, chunk: int = 64):
    """One sequence's ``n`` tokens: q, k ``[h, n, dk]`` (normalised, q scaled), v ``[h, n, dv]``,
    g (log decay), beta ``[h, n]``, all float32; ``S`` ``[h, dk, dv]`` or None (zeros).
    Returns (out ``[h, n, dv]``, the state after the last token)."""
    h, n, dk = k.shape
    dv = v.shape[-1]
    pad = (chunk - n % chunk) % chunk
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    N = (n + pad) // chunk
    vb, kb = v * beta[..., None], k * beta[..., None]
    q, k, kb, vb = (x.reshape(h, N, chunk, x.shape[-1]) for x in (q, k, kb, vb))
    cum = g.reshape(h, N, chunk).cumsum(dim=-1)
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf")).exp()
    ut = (kb @ k.transpose(-1, -2)) * decay
    intra = (q @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(ut, vb, upper=False, unitriangular=True)
    kc = torch.linalg.solve_triangular(ut, kb * cum.exp()[..., None], upper=False, unitriangular=True)
    S = q.new_zeros(h, dk, dv) if S is None else S.float()
    qd = q * cum.exp()[..., None]
    kd = k * (cum[..., -1:] - cum).exp()[..., None]
    cd = cum[..., -1].exp()[..., None, None]  # [h, N, 1, 1]
    out = torch.empty_like(u)
    for i in range(N):
        vn = u[:, i] - kc[:, i] @ S
        out[:, i] = qd[:, i] @ S + intra[:, i] @ vn
        S = S * cd[:, i] + kd[:, i].transpose(-1, -2) @ vn
    return out.reshape(h, N * chunk, dv)[:, :n], S


def recurrent_step(q, k, v, g, beta, S):
    """One token of each of ``B`` sequences: q, k ``[B, h, dk]`` (normalised, q scaled), v ``[B, h, dv]``,
    g, beta ``[B, h]``, ``S`` ``[B, h, dk, dv]``, float32. Returns (out ``[B, h, dv]``, new ``S``)."""
    S = S * g.exp()[..., None, None]
    mem = (S * k[..., None]).sum(dim=-2)
    delta = (v - mem) * beta[..., None]
    S = S + k[..., None] * delta[..., None, :]
    return (S * q[..., None]).sum(dim=-2), S


class GatedDeltaNet(nn.Module):
    """The linear-attention layer, with Qwen3-Next's projections (``in_proj_qkvz``, ``in_proj_ba``,
    grouped per key head); :class:`SplitGatedDeltaNet` has Qwen3.5's four separate ones."""

    def __init__(self, args, layer: int):
        super().__init__()
        self.layer = layer
        self.hk, self.hv = args.linear_num_key_heads, args.linear_num_value_heads
        self.dk, self.dv = args.linear_key_head_dim, args.linear_value_head_dim
        self.K = args.linear_conv_kernel_dim
        self.key_dim, self.value_dim = self.hk * self.dk, self.hv * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        H = args.hidden_size
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.K, groups=self.conv_dim, bias=False,
                                padding=self.K - 1)
        self._projections(H)
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.A_log = nn.Parameter(torch.zeros(self.hv))
        self.norm = GatedRMSNorm(self.dv, args.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, H, bias=False)

    def _projections(self, H: int) -> None:
        self.in_proj_qkvz = nn.Linear(H, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(H, 2 * self.hv, bias=False)

    def project(self, x: torch.Tensor):
        """x ``[T, H]`` -> (conv input ``[T, C]``: q, k, v flat; z ``[T, hv, dv]``; b, a ``[T, hv]``)."""
        T, r = x.shape[0], self.hv // self.hk
        qkvz = self.in_proj_qkvz(x).view(T, self.hk, 2 * self.dk + 2 * r * self.dv)
        q, k, v, z = torch.split(qkvz, [self.dk, self.dk, r * self.dv, r * self.dv], dim=-1)
        b, a = torch.split(self.in_proj_ba(x).view(T, self.hk, 2 * r), [r, r], dim=-1)
        mixed = torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], dim=-1)
        return mixed, z.reshape(T, self.hv, self.dv), b.reshape(T, self.hv), a.reshape(T, self.hv)

    def cache_spec(self, dtype: torch.dtype) -> LayerCache:
        return cache_of(self.hk, self.hv, self.dk, self.dv, self.K, dtype)

    def _qkv(self, conv_out: torch.Tensor, scale_div: bool):
        """conv output ``[..., C]`` -> q, k ``[..., hv, dk]`` (normalised, q scaled), v ``[..., hv, dv]``, float32."""
        lead = conv_out.shape[:-1]
        q, k, v = torch.split(conv_out, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q, k = q.reshape(*lead, self.hk, self.dk), k.reshape(*lead, self.hk, self.dk)
        v = v.reshape(*lead, self.hv, self.dv)
        if self.hv != self.hk:
            q, k = (t.repeat_interleave(self.hv // self.hk, dim=-2) for t in (q, k))
        q, k, v = l2norm(q.float()), l2norm(k.float()), v.float()
        q = q / self.dk**0.5 if scale_div else q * self.dk**-0.5
        return q, k, v

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T = x.shape[0]
        mixed, z, b, a = self.project(x)
        beta = b.sigmoid().float()  # [T, hv]
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        out = x.new_empty(T, self.hv, self.dv)
        spec = self.cache_spec(mixed.dtype).shapes
        w = self.conv1d.weight  # [C, 1, K]
        decode = [i for i, (s, n) in enumerate(zip(batch.starts, batch.lengths)) if n == 1 and s > 0]
        skip = set(decode)
        for i, (start, n) in enumerate(zip(batch.starts, batch.lengths)):
            if i in skip or n == 0:
                continue
            lo, hi = batch.offsets[i], batch.offsets[i + 1]
            conv_state, S = batch.caches[i].state(self.layer, spec)
            xs = mixed[lo:hi].t()  # [C, n]
            prev = conv_state if start > 0 else xs.new_zeros(self.conv_dim, self.K - 1)
            xin = torch.cat([prev, xs], dim=-1)
            conv_state.copy_(xin[:, xin.shape[-1] - (self.K - 1):])  # the window the next step sees
            y = causal_conv(xin, w).t()  # [n, C]
            q, k, v = self._qkv(y, scale_div=False)
            o, S_new = chunk_rule(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), g[lo:hi].t(),
                                  beta[lo:hi].t(), S if start > 0 else None)
            S.copy_(S_new)
            out[lo:hi] = o.transpose(0, 1).to(x.dtype)
        if decode:
            out[self._rows(batch, decode)] = self._decode(batch, decode, mixed, g, beta, spec).to(x.dtype)
        o = self.norm(out.reshape(T * self.hv, self.dv), z.reshape(T * self.hv, self.dv))
        return self.out_proj(o.reshape(T, self.value_dim))

    @staticmethod
    def _rows(batch: ForwardBatch, seqs: list[int]) -> torch.Tensor:
        return torch.tensor([batch.offsets[i] for i in seqs], device=batch.positions.device)

    def _decode(self, batch, seqs, mixed, g, beta, spec) -> torch.Tensor:
        """One token of each sequence ``seqs``: the conv and the recurrent step batched; returns ``[B, hv, dv]``."""
        rows = self._rows(batch, seqs)
        caches = [batch.caches[i] for i in seqs]
        pool = caches[0].pool
        if pool is not None and all(c.pool is pool for c in caches):  # gather / scatter the pool's rows
            slots = torch.tensor([c.slot for c in caches], device=mixed.device)
            conv_all, S_all = pool.state(self.layer, spec)
            conv, S = conv_all[slots], S_all[slots]
        else:
            slots = None
            parts = [c.state(self.layer, spec) for c in caches]
            conv, S = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
        xin = torch.cat([conv, mixed[rows][:, :, None]], dim=-1)  # [B, C, K]
        y = causal_conv(xin, self.conv1d.weight)[:, :, 0]  # [B, C]
        q, k, v = self._qkv(y, scale_div=True)
        o, S = recurrent_step(q, k, v, g[rows], beta[rows], S)
        if slots is not None:
            conv_all[slots] = xin[:, :, 1:]
            S_all[slots] = S
        else:
            for j, p in enumerate(parts):
                p[0].copy_(xin[j, :, 1:])
                p[1].copy_(S[j])
        return o


class SplitGatedDeltaNet(GatedDeltaNet):
    """Qwen3.5: ``in_proj_qkv`` (already q, k, v flat), ``in_proj_z``, ``in_proj_b``, ``in_proj_a``."""

    def _projections(self, H: int) -> None:
        self.in_proj_qkv = nn.Linear(H, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(H, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(H, self.hv, bias=False)
        self.in_proj_a = nn.Linear(H, self.hv, bias=False)

    def project(self, x: torch.Tensor):
        T = x.shape[0]
        return self.in_proj_qkv(x), self.in_proj_z(x).view(T, self.hv, self.dv), self.in_proj_b(x), self.in_proj_a(x)
