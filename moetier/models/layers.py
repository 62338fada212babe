"""Building blocks shared by the families: RMSNorm, rotary embeddings, attention.

Shapes: ``T`` tokens of a step (all sequences concatenated), ``H`` hidden size,
``h`` heads, ``d`` head dim.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ..runtime.batch import DecodeGroup, ForwardBatch
from .args import BaseModelArgs, RopeArgs


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32, as transformers does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class ZeroCenteredRMSNorm(RMSNorm):
    """RMS normalisation scaled by ``1 + weight`` in float32, then rounded (Qwen3-Next, Qwen3.5).

    The weight is stored zero-centred, as the checkpoints hold it."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """RMSNorm of ``x``, then times ``silu(gate)`` in float32 (the output norm of a gated DeltaNet layer)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return (super().forward(x) * F.silu(gate.float())).to(x.dtype)


def _yarn_inv_freq(rope: RopeArgs, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones (arXiv 2309.00071)."""
    p = rope.params
    base = rope.theta
    factor = p.get("factor")
    orig = p.get("original_max_position_embeddings") or max_pos
    if factor is None:
        factor = max_pos / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = p.get("attention_factor")
    if attn_factor is None:
        ms, ms_all = p.get("mscale"), p.get("mscale_all_dim")
        attn_factor = mscale(factor, ms) / mscale(factor, ms_all) if ms and ms_all else mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrap_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrap_weight) + extrapolation * extrap_weight
    return inv_freq, float(attn_factor)


def _llama3_inv_freq(rope: RopeArgs, inv_freq: torch.Tensor) -> torch.Tensor:
    """Llama 3.1 / Llama 4 scaling: low frequencies divided by ``factor``, a smooth ramp between."""
    p = rope.params
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def _short_longrope_inv_freq(rope: RopeArgs, dim: int) -> tuple[torch.Tensor, float]:
    """LongRoPE's short factors, scaled by ``short_mscale``: the rope transformers' Phi-MoE computes at
    every length (its long factors are never used; a family allows ``longrope`` only where that holds)."""
    p = rope.params
    idx = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (torch.tensor(p["short_factor"], dtype=torch.float32) * rope.theta**idx)
    return inv_freq, float(p["short_mscale"])


class Rotary(nn.Module):
    """Rotary position embedding with a lazily grown cos/sin table.

    ``interleaved`` rotates adjacent pairs (DeepSeek-V3 ``rope_interleave``)
    instead of the two halves of the head. Layers with the same rotary settings share one
    table, and the angles of a step's positions are gathered once for all of them (see
    :class:`_RopeTable`): at decode that is one gather per step instead of four per layer.
    """

    def __init__(self, dim: int, rope: RopeArgs, max_pos: int, interleaved: bool = False):
        super().__init__()
        self.dim = dim
        self.rope = rope
        self.max_pos = max_pos
        self.interleaved = interleaved
        self._key = (dim, rope.theta, rope.kind, rope.factor, repr(sorted(rope.params.items())), max_pos)
        self._tables: dict = {}  # device -> its _RopeTable (held here: the registry only keeps live ones)

    def _table(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared ``[pos, d]`` float32 cos and sin tables, at least ``n`` positions."""
        return self._shared(torch.device(device)).grown(self, n)

    def _build(self, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope.kind == "yarn":
            inv_freq, scale = _yarn_inv_freq(self.rope, self.dim, self.max_pos)
        elif self.rope.kind == "longrope":
            inv_freq, scale = _short_longrope_inv_freq(self.rope, self.dim)
        else:
            idx = torch.arange(0, self.dim, 2, dtype=torch.int64, device="cpu").float()
            inv_freq, scale = 1.0 / (self.rope.theta ** (idx / self.dim)), 1.0
            if self.rope.kind == "linear":
                inv_freq = inv_freq / self.rope.factor
            elif self.rope.kind == "llama3":
                inv_freq = _llama3_inv_freq(self.rope, inv_freq)
        t = torch.arange(size, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(device), (emb.sin() * scale).to(device)

    def angles(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of ``positions`` ``[T]``, each ``[T, 1, d]`` in ``dtype`` (memoised per step);
        the first half of sin negated, as :meth:`forward` uses it."""
        return self._shared(positions.device).angles(self, positions, dtype)

    def _shared(self, device: torch.device) -> "_RopeTable":
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = _RopeTable.get(self._key, device)
        return table

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``[T, h, d]`` by the angles of ``positions`` ``[T]``."""
        cos, sin = self.angles(positions, x.dtype)
        if self.interleaved:
            t, h, d = x.shape
            x = x.view(t, h, d // 2, 2).transpose(-1, -2).reshape(t, h, d)
        # x * cos + cat(-x2, x1) * sin, with the sign folded into sin (negation is exact, so the
        # products are the same numbers): rolling by half the head swaps the halves in one op
        return x * cos + x.roll(self.dim // 2, -1) * sin


class _RopeTable:
    """The cos/sin tables of one rotary setting on one device, and the angles of the last positions.

    Every layer's :class:`Rotary` rotates by the same step's ``positions`` tensor (the batch's), so the
    gather ``cos[positions].to(dtype)`` is done by the first and reused by the rest, recognised by the
    tensor's identity (the entry holds a reference to it, so the id cannot be reused meanwhile).
    Entries are replaced whole (one assignment), so concurrent engines at worst recompute.
    """

    _all: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()  # freed with the last model using it

    def __init__(self, device):
        self.device = device
        self.cos = self.sin = None  # [pos, d] float32
        self.last = None  # (positions, dtype, cos [T, 1, d], sin [T, 1, d])

    @classmethod
    def get(cls, key, device: torch.device) -> "_RopeTable":
        table = cls._all.get((key, device))
        if table is None:
            table = cls._all.setdefault((key, device), cls(device))
        return table

    def grown(self, rotary: Rotary, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos, self.sin
        if cos is None or cos.shape[0] < n:
            size = max(n, 2 * (cos.shape[0] if cos is not None else 256))
            cos, sin = rotary._build(size, self.device)
            self.cos, self.sin = cos, sin
        return cos, sin

    def angles(self, rotary: Rotary, positions: torch.Tensor, dtype: torch.dtype):
        last = self.last
        if last is not None and last[0] is positions and last[1] == dtype:
            return last[2], last[3]
        cos, sin = self.grown(rotary, int(positions.max()) + 1)
        cos = cos[positions].to(dtype)[:, None, :]  # [T, 1, d]
        sin = sin[positions].to(dtype)[:, None, :]
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        self.last = (positions, dtype, cos, sin)
        return cos, sin


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float, window: int | None = None
) -> torch.Tensor:
    """Causal attention of one sequence's new queries against its whole cache.

    q ``[hq, n, d]`` at positions ``start..start+n-1``; k ``[hk, L, d]``, v
    ``[hk, L, dv]`` with ``L = start + n``. Grouped-query heads are folded into
    the query rows (``[hk, g*n, d]``) so K and V are never repeated.
    ``window`` (sliding-window attention): a query at ``p`` sees keys ``> p - window``.
    Returns ``[n, hq * dv]``.
    """
    hq, n, d = q.shape
    hk, L, dv = v.shape
    g = hq // hk
    qg = q.reshape(hk, g * n, d)
    lo = max(0, start - window + 1) if window else 0  # keys before lo are outside every query's window
    if lo:
        k, v = k[:, lo:], v[:, lo:]
    mask = None
    if n > 1:
        qpos = torch.arange(start, start + n, device=q.device).repeat(g)  # [g*n]
        kpos = torch.arange(lo, L, device=q.device)[None, :]
        mask = kpos <= qpos[:, None]  # [g*n, L - lo]
        if window:
            mask &= kpos > qpos[:, None] - window
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # [hk, g*n, dv]
    return out.view(hq, n, dv).transpose(0, 1).reshape(n, hq * dv)


def attend_batch(
    batch: ForwardBatch, layer: int, q: torch.Tensor, kv: tuple[torch.Tensor, ...], scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Write each sequence's new ``k, v`` (``[T, hk, d]``) to its cache and attend.

    q is ``[T, hq, d]``; returns ``[T, hq * dv]``. The sequences that add one token
    (decoding) attend together in one padded call (see ``ForwardBatch.decode_group``);
    the others (prompt chunks) attend one by one.
    """
    if len(batch.lengths) == 1:  # one sequence (batch-1 decode, a lone prompt): attend in place
        parts = [t.transpose(0, 1) for t in kv]  # each [hk, T, d]
        k_all, v_all = batch.caches[0].write(layer, batch.starts[0], *parts)
        return attend(q.transpose(0, 1), k_all, v_all, batch.starts[0], scale, window)
    group = batch.decode_group()
    if group is not None and window and group.length > 2 * window:
        group = None  # most of each cache is outside the window: per sequence, only the window is read
    if group is not None and len(group.seqs) == len(batch.lengths):
        return _attend_decode(batch, group, layer, q, kv, scale, window)
    out = q.new_empty(q.shape[0], q.shape[1] * kv[-1].shape[-1])  # [T, hq * dv]
    skip = set(group.seqs) if group is not None else ()
    for i, cache in enumerate(batch.caches):
        if i in skip:
            continue
        a, b = batch.offsets[i], batch.offsets[i + 1]
        parts = [t[a:b].transpose(0, 1) for t in kv]  # each [hk, n, d]
        k_all, v_all = cache.write(layer, batch.starts[i], *parts)
        out[a:b] = attend(q[a:b].transpose(0, 1), k_all, v_all, batch.starts[i], scale, window)
    if group is not None:
        out[group.rows] = _attend_decode(batch, group, layer, q, kv, scale, window)
    return out


def _attend_decode(
    batch: ForwardBatch, group: DecodeGroup, layer: int, q: torch.Tensor, kv: tuple[torch.Tensor, ...],
    scale: float, window: int | None,
) -> torch.Tensor:
    """The group's sequences each add one token: pad their caches to the longest and attend in one call.

    One fused call instead of B small ones; the padding copy is the price (bounded: the group
    exists only while padding at most doubles the keys). Returns ``[B, hq * dv]`` in group order.
    """
    B = len(group.seqs)
    if group.first_row is not None:  # [B, hq, d] / [B, hk, d]: slices, no gather
        qb, new = q[group.first_row : group.first_row + B], [t[group.first_row : group.first_row + B] for t in kv]
    else:
        qb, new = q[group.rows], [t[group.rows] for t in kv]
    if group.pool is not None and all(batch.caches[i].pooled(layer) for i in group.seqs):
        return _attend_pool(group, layer, qb, new, scale, window)
    views = [batch.caches[i].write(layer, batch.starts[i], *(t[j, :, None] for t in new))
             for j, i in enumerate(group.seqs)]  # per sequence: ([hk, L_i, d], [hk, L_i, dv])
    # pad_sequence pads the leading dim, so lay each cache out as [L_i, hk, d]
    k = pad_sequence([kk.transpose(0, 1) for kk, _ in views], batch_first=True).transpose(1, 2)  # [B, hk, L, d]
    v = pad_sequence([vv.transpose(0, 1) for _, vv in views], batch_first=True).transpose(1, 2)  # [B, hk, L, dv]
    hk, dv = v.shape[1], v.shape[3]
    hq, d = q.shape[1], q.shape[2]
    qg = qb.reshape(B, hk, hq // hk, d)  # grouped-query heads folded into query rows, as in attend()
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=group.mask(window), scale=scale)
    return out.reshape(B, hq * dv)


def _attend_pool(
    group: DecodeGroup, layer: int, qb: torch.Tensor, new: list[torch.Tensor], scale: float, window: int | None,
) -> torch.Tensor:
    """:func:`_attend_decode` on a KV pool: one scatter writes the B new tokens into their rows and
    one call attends over the pool's rows from the group's first to its last as they lie (no
    per-sequence copies, no padding copy)."""
    pool, slots, pos = group.pool, group.slots, group.qpos[:, 0]  # a new token's position is its cache index
    bufs = pool.layer(layer, tuple(t[0, :, None] for t in new))  # each [slots, hk, cap, d]
    (lo, hi), L = group.pool_rows, group.length
    rows = [b[lo:hi] for b in bufs]
    for buf, t in zip(rows, new):
        buf[slots, :, pos] = t  # [B, hk, d]
    S, hk, dv = hi - lo, rows[-1].shape[1], rows[-1].shape[3]
    hq, d = qb.shape[1], qb.shape[2]
    qs = qb.new_zeros(S, hq, d)
    qs[slots] = qb
    out = F.scaled_dot_product_attention(qs.view(S, hk, hq // hk, d), rows[0][:, :, :L], rows[-1][:, :, :L],
                                         attn_mask=group.mask(window, pooled=True), scale=scale)
    return out.reshape(S, hq * dv)[slots]


class Attention(nn.Module):
    """Grouped-query attention with optional q/k RMSNorm.

    ``qk_norm="head"`` normalises each head (Qwen3-MoE); ``"full"`` normalises
    the whole projection before the head split (OLMoE). ``clip_qkv`` clamps
    q, k, v after that norm (OLMoE); ``sliding_window`` limits how far back a
    query looks (Qwen-MoE with ``use_sliding_window``). The output projection
    has a bias iff ``args.attention_bias`` unless ``o_bias`` says otherwise.
    ``qk_norm="head_after_rope"`` normalises each head after the rotation (Hunyuan).
    ``rotary_dim`` rotates only the first that many dims of each head (GLM-4.5's
    partial rotary), ``interleaved_rope`` rotates adjacent pairs (ERNIE); ``scale``
    replaces ``head_dim**-0.5`` (Granite's attention_multiplier).
    """

    def __init__(
        self,
        args: BaseModelArgs,
        layer: int,
        qk_norm: str | None = None,
        qkv_bias: bool = False,
        clip_qkv: float | None = None,
        sliding_window: int | None = None,
        o_bias: bool | None = None,
        rotary_dim: int | None = None,
        scale: float | None = None,
        interleaved_rope: bool = False,
    ):
        super().__init__()
        self.layer = layer
        self.hq, self.hk, self.d = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        H = args.hidden_size
        self.q_proj = nn.Linear(H, self.hq * self.d, bias=qkv_bias)
        self.k_proj = nn.Linear(H, self.hk * self.d, bias=qkv_bias)
        self.v_proj = nn.Linear(H, self.hk * self.d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.hq * self.d, H, bias=args.attention_bias if o_bias is None else o_bias)
        self.clip_qkv = clip_qkv
        self.window = sliding_window
        self.qk_norm = qk_norm
        if qk_norm in ("head", "head_after_rope"):
            self.q_norm = RMSNorm(self.d, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.d, args.rms_norm_eps)
        elif qk_norm == "full":
            self.q_norm = RMSNorm(self.hq * self.d, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.hk * self.d, args.rms_norm_eps)
        self.rotary = Rotary(rotary_dim or self.d, args.rope, args.max_position_embeddings,
                             interleaved=interleaved_rope)
        self.scale = self.d**-0.5 if scale is None else scale

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(T, self.hq, self.d)
        k = k.view(T, self.hk, self.d)
        v = v.view(T, self.hk, self.d)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rotate(q, batch.positions), self._rotate(k, batch.positions)
        if self.qk_norm == "head_after_rope":
            q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(attend_batch(batch, self.layer, q, (k, v), self.scale, self.window))

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary on ``x`` ``[T, h, d]``: all of each head, or its first ``rotary.dim`` dims (partial rotary)."""
        r = self.rotary.dim
        if r == self.d:
            return self.rotary(x, positions)
        return torch.cat((self.rotary(x[..., :r], positions), x[..., r:]), dim=-1)
