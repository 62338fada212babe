"""What each decoder layer caches per sequence, as the model declares it.

A layer caches one of:

- ``kv``: keys and values (or DeepSeek's latent) of every position: ``bytes_per_token`` each;
- ``state``: a fixed-size state whatever the sequence's length (a gated DeltaNet layer's conv
  window and recurrent state): ``bytes_per_seq``, its tensors listed in ``shapes``.

A family's args say it with ``layer_caches(dtype)`` (default: every layer ``kv``, see
:meth:`moetier.models.args.BaseModelArgs.layer_caches`). :class:`~moetier.runtime.kv_cache.SeqKV`
holds both kinds (``write``/``reserve`` for KV, ``state`` for states) and a
:class:`~moetier.runtime.kv_cache.KVPool` rows of both; the memory accounting (KV reserve, planner,
throughput admission) sums the two per sequence with :func:`seq_bytes`. A bounded kind (a
sliding-window KV of at most ``window`` positions) fits the same record.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerCache:
    kind: str  # "kv" | "state"
    bytes_per_token: int = 0  # kv: what one position adds
    shapes: tuple[tuple[tuple[int, ...], torch.dtype], ...] = ()  # state: (shape, dtype) of each tensor

    @property
    def bytes_per_seq(self) -> int:
        """Fixed bytes per sequence (a state's tensors)."""
        return sum(torch.Size(s).numel() * d.itemsize for s, d in self.shapes)


def kv(bytes_per_token: int) -> LayerCache:
    return LayerCache("kv", bytes_per_token=bytes_per_token)


def state(*shapes: tuple[tuple[int, ...], torch.dtype]) -> LayerCache:
    return LayerCache("state", shapes=tuple((tuple(s), d) for s, d in shapes))


def layer_caches(args, dtype: torch.dtype) -> list[LayerCache]:
    return list(args.layer_caches(dtype))


def kv_bytes_per_token(args, dtype: torch.dtype) -> int:
    """Bytes one more position of a sequence takes, all layers (states add nothing)."""
    return sum(c.bytes_per_token for c in layer_caches(args, dtype))


def state_bytes_per_seq(args, dtype: torch.dtype) -> int:
    """Fixed bytes per sequence, whatever its length: the states of every ``state`` layer."""
    return sum(c.bytes_per_seq for c in layer_caches(args, dtype))


def seq_bytes(args, dtype: torch.dtype, tokens: int) -> int:
    """What a sequence of ``tokens`` positions holds in its caches, all layers and kinds."""
    return tokens * kv_bytes_per_token(args, dtype) + state_bytes_per_seq(args, dtype)
