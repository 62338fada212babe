"""Sparsity-aware utilization (S-MBU, S-MFU) and cost: the formulas, as pure functions.

A forward step feeds ``n_i`` new tokens of each sequence ``i`` whose KV cache already
holds ``s_i`` tokens. With the model's :class:`~moetier.bench.shape.ModelShape`:

    bytes(step) = resident weight bytes
                + sum over MoE layers of (distinct experts activated in the step x bytes per expert)
                + sum_i (s_i + n_i) x KV bytes per token                  (in the KV cache's dtype)
                + sum over bounded layers, sum_i (keys the step reads there) x its bytes per position
                + sequences x state bytes per sequence                     (linear-attention layers)

    FLOPs(step) = 2 x (dense + shared + top_k x expert x MoE layers) params x sum_i n_i
                + 2 x LM-head params x rows sampled
                + attention FLOPs per query-key pair x sum_i (n_i s_i + n_i (n_i + 1) / 2)
                + per bounded layer, its FLOPs per pair x the causal pairs its window or chunk allows
                + state-update FLOPs per token x sum_i n_i                 (linear-attention layers)

A sliding-window layer's step reads at most the window (``min(s_i, w - 1) + n_i`` keys), a chunked
layer's the current chunk (``s_i mod c + n_i``), a query there seeing ``min(p + 1, w)`` or
``p mod c + 1`` keys (``runtime/cache_spec.py`` counts both for every layer kind).

    S-MBU = bytes / seconds / peak bandwidth        S-MFU = FLOPs / seconds / peak dense FLOP/s

Each sequence's attention is counted once, over its own causal query-key pairs; every
token runs ``top_k`` experts. docs/metrics.md derives these and says how they differ
from MoE-CAP's published code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..runtime.cache_spec import causal_pairs, keys_read
from .shape import ModelShape


@dataclass
class Step:
    """One forward step as the metrics see it."""

    seconds: float
    starts: list[int]  # tokens each sequence's KV cache held before the step
    lengths: list[int]  # tokens each sequence fed in the step
    experts: list[int]  # distinct routed experts per MoE layer: the union over the step's tokens

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def rows(self) -> int:
        """Tokens sampled: one per sequence (each step feeds the rest of a sequence's pending tokens)."""
        return len(self.lengths)

    @property
    def prefill(self) -> bool:
        """Whether the step feeds prompt tokens: a first chunk (empty cache) or more than one token."""
        return any(s == 0 or n > 1 for s, n in zip(self.starts, self.lengths))


def attention_pairs(starts: list[int], lengths: list[int]) -> int:
    """Causal query-key pairs: the j-th new token of a sequence (j = 1..n) sees ``s + j`` keys."""
    return sum(n * s + n * (n + 1) // 2 for s, n in zip(starts, lengths))


def kv_bytes_read(shape: ModelShape, starts: list[int], lengths: list[int]) -> int:
    """KV cache bytes a step reads: every sequence's whole cache, its new tokens included, once; a bounded
    layer's window or chunk only; its linear-attention layers' fixed-size states once."""
    tokens = sum(s + n for s, n in zip(starts, lengths))
    bounded = sum(per * keys_read(kind, limit, s, n) for kind, limit, per in shape.bounded
                  for s, n in zip(starts, lengths))
    return tokens * shape.kv_bytes_per_token + bounded + len(starts) * shape.state_bytes_per_seq


def step_bytes(shape: ModelShape, step: Step) -> int:
    """Bytes a step must move from memory: resident weights, the activated experts, the KV cache."""
    return shape.resident_bytes + sum(step.experts) * shape.expert_bytes + kv_bytes_read(shape, step.starts, step.lengths)


def step_flops(shape: ModelShape, step: Step) -> int:
    """FLOPs a step must do (a multiply-add is 2): every token through the dense weights, the
    shared experts and its ``top_k`` routed experts; the LM head for the sampled rows; attention."""
    per_token = shape.dense_params + shape.shared_params + shape.top_k * shape.expert_params * shape.moe_layers
    bounded = sum(causal_pairs(kind, limit, s, n) for kind, limit, _ in shape.bounded
                  for s, n in zip(step.starts, step.lengths))
    return (2 * per_token * step.tokens + 2 * shape.head_params * step.rows
            + shape.attn_flops_per_pair * attention_pairs(step.starts, step.lengths)
            + shape.layer_pair_flops * bounded + shape.state_flops_per_token * step.tokens)


def utilization(amount: float, seconds: float, peak_per_second: float) -> float:
    """Achieved rate as a share of the peak: S-MBU with bytes and bandwidth, S-MFU with FLOPs and FLOP/s."""
    return amount / seconds / peak_per_second


def usd_per_million(usd_per_hour: float, seconds: float, tokens: int) -> float:
    """Dollars per million tokens when ``tokens`` took ``seconds`` of hardware rented at ``usd_per_hour``."""
    return usd_per_hour * seconds / 3600 / tokens * 1e6


def kwh_per_million(watts: float, seconds: float, tokens: int) -> float:
    """Kilowatt-hours per million tokens drawing ``watts`` for ``seconds`` (1 kWh = 3.6e6 J)."""
    return watts * seconds / 3.6e6 / tokens * 1e6


def percentiles(samples: list[float]) -> dict[str, float]:
    """Mean, p50, p90 and p99 (linear interpolation) of ``samples``."""
    a = np.asarray(samples, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}
