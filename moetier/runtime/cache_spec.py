"""What each decoder layer caches per sequence, as the model declares it.

A layer caches one of:

- ``kv``: keys and values (or DeepSeek's latent) of every position: ``bytes_per_token`` each;
- ``window``: keys and values of at most ``limit`` positions, the last ones (gpt-oss's sliding layers:
  a ring of the window, ``SeqKV.write_window``); a query sees the ``limit`` positions up to its own;
- ``chunk``: keys and values of at most ``limit`` positions, those of the current chunk (Llama 4's
  chunked layers, ``SeqKV.write_chunked``); a query sees the keys of its own chunk only;
- ``state``: a fixed-size state whatever the sequence's length (a gated DeltaNet layer's conv
  window and recurrent state): ``bytes_per_seq``, its tensors listed in ``shapes``, and the FLOPs its
  update takes per token (``flops_per_token``, for the cost models).

A family's args say it with ``layer_caches(dtype)`` (default: every layer ``kv``, see
:meth:`moetier.models.args.BaseModelArgs.layer_caches`). :class:`~moetier.runtime.kv_cache.SeqKV`
holds every kind (``write``/``reserve`` for KV, the rings, ``state`` for states) and a
:class:`~moetier.runtime.kv_cache.KVPool` rows of each. Every memory count goes through here: the
KV reserve, the planner and the throughput admission take :func:`seq_bytes` (a bounded layer counts
``min(tokens, limit)`` positions, a state layer its state once), the planner's attention cost and
``moetier bench``'s bytes and FLOPs per step the keys a step reads (:meth:`LayerCache.keys`) and the
query-key pairs it needs (:meth:`LayerCache.pairs`) per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("kv", "window", "chunk", "state")
BOUNDED = ("window", "chunk")


@dataclass(frozen=True)
class LayerCache:
    kind: str  # one of KINDS
    bytes_per_token: int = 0  # kv, window, chunk: what one position holds
    shapes: tuple[tuple[tuple[int, ...], torch.dtype], ...] = ()  # state: (shape, dtype) of each tensor
    limit: int = 0  # window, chunk: the most positions held
    flops_per_token: int = 0  # state: FLOPs of the state's update per token fed

    @property
    def bytes_per_seq(self) -> int:
        """Fixed bytes per sequence (a state's tensors)."""
        return sum(torch.Size(s).numel() * d.itemsize for s, d in self.shapes)

    @property
    def attends(self) -> bool:
        """Whether the layer attends over cached keys (every kind but ``state``)."""
        return self.kind != "state"

    def positions(self, tokens: int) -> int:
        """Positions held for a sequence of ``tokens`` tokens."""
        if self.kind == "kv":
            return tokens
        return min(tokens, self.limit) if self.kind in BOUNDED else 0

    def seq_bytes(self, tokens: int) -> int:
        """What this layer holds for a sequence of ``tokens`` tokens."""
        return self.positions(tokens) * self.bytes_per_token + self.bytes_per_seq

    def keys(self, start: int, n: int) -> int:
        """Cached positions a step of ``n`` new tokens at ``start..`` attends over (its own included):
        what the attention reads (``SeqKV.write``, ``write_window``, ``write_chunked`` return as many)."""
        return keys_read(self.kind, self.limit, start, n)

    def pairs(self, start: int, n: int) -> int:
        """Causal query-key pairs of those ``n`` queries (each sees what its position may)."""
        return causal_pairs(self.kind, self.limit, start, n)


def keys_read(kind: str, limit: int, start: int, n: int) -> int:
    """:meth:`LayerCache.keys` of a ``kind`` layer bounded to ``limit`` positions (plain numbers, so that
    ``moetier bench``'s JSON-friendly shape can call it)."""
    if kind == "kv":
        return start + n
    if kind == "window":  # the ring's previous limit - 1 positions and the new ones
        return min(start, limit - 1) + n
    if kind == "chunk":  # the current chunk's earlier positions and the new ones
        return start % limit + n
    return 0


def _seen_before(kind: str, limit: int, end: int) -> int:
    """Query-key pairs of the queries at positions ``0..end-1``."""
    if kind == "kv":
        return end * (end + 1) // 2
    if kind == "window":  # a query at p sees min(p + 1, limit) keys
        w = min(end, limit)
        return w * (w + 1) // 2 + (end - w) * limit
    if kind == "chunk":  # a query at p sees p % limit + 1 keys
        full, r = divmod(end, limit)
        return full * limit * (limit + 1) // 2 + r * (r + 1) // 2
    return 0


def causal_pairs(kind: str, limit: int, start: int, n: int) -> int:
    """:meth:`LayerCache.pairs` of a ``kind`` layer bounded to ``limit`` positions."""
    return _seen_before(kind, limit, start + n) - _seen_before(kind, limit, start)


def kv(bytes_per_token: int) -> LayerCache:
    return LayerCache("kv", bytes_per_token=bytes_per_token)


def window(bytes_per_token: int, limit: int) -> LayerCache:
    """Keys and values of the last ``limit`` positions (a sliding window)."""
    return LayerCache("window", bytes_per_token=bytes_per_token, limit=int(limit))


def chunk(bytes_per_token: int, limit: int) -> LayerCache:
    """Keys and values of the current chunk of ``limit`` positions (chunked attention)."""
    return LayerCache("chunk", bytes_per_token=bytes_per_token, limit=int(limit))


def state(*shapes: tuple[tuple[int, ...], torch.dtype], flops_per_token: int = 0) -> LayerCache:
    return LayerCache("state", shapes=tuple((tuple(s), d) for s, d in shapes), flops_per_token=int(flops_per_token))


def layer_caches(args, dtype: torch.dtype) -> list[LayerCache]:
    return list(args.layer_caches(dtype))


def kv_bytes_per_token(args, dtype: torch.dtype) -> int:
    """Bytes one more position adds to a long sequence, all layers: the unbounded KV layers' (bounded
    layers stop growing at their limit, states never grow; :func:`seq_bytes` counts them all)."""
    return sum(c.bytes_per_token for c in layer_caches(args, dtype) if c.kind == "kv")


def state_bytes_per_seq(args, dtype: torch.dtype) -> int:
    """Fixed bytes per sequence, whatever its length: the states of every ``state`` layer."""
    return sum(c.bytes_per_seq for c in layer_caches(args, dtype))


def seq_bytes(args, dtype: torch.dtype, tokens: int) -> int:
    """What a sequence of ``tokens`` positions holds in its caches, all layers and kinds."""
    return sum(c.seq_bytes(tokens) for c in layer_caches(args, dtype))
