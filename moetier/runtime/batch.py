"""What one forward step computes: a flat list of new tokens from several sequences.

Tokens of all sequences are concatenated (``[T, hidden]``) so that every
projection and every expert runs once on all of them; only attention is split
per sequence, against that sequence's own KV cache. No padding is ever added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .kv_cache import KVPool, SeqKV


@dataclass
class DecodeGroup:
    """The sequences of a step that add one token each: they attend together in one padded call.

    Built once per step (the same for every layer): which sequences, where their tokens sit
    in the flat ``[T]`` layout, their query positions and, per sliding window, the mask.
    """

    seqs: list[int]  # indices into the batch
    rows: torch.Tensor  # [B] their tokens in the flat [T] layout
    first_row: Optional[int]  # the rows are first_row..first_row+B-1 (q[rows] is then a slice), else None
    length: int  # the longest cache after the step: the padded key length L
    qpos: torch.Tensor  # [B, 1] each query's position
    pool: Optional[KVPool] = None  # all their caches are rows of this pool: attend on it directly
    slots: Optional[torch.Tensor] = None  # [B] their pool rows, counted from pool_rows[0]
    pool_rows: tuple[int, int] = (0, 0)  # the pool's rows [lo, hi) the call attends over: the group's and between
    _masks: dict = field(default_factory=dict)

    def mask(self, window: Optional[int], pooled: bool = False) -> torch.Tensor:
        """``[B, 1, 1, L]``: a query sees its own sequence's keys (within ``window``), never the padding.
        ``pooled``: ``[S, 1, 1, L]`` over the pool's ``S`` rows ``pool_rows``, where the rows of sequences
        outside the group see key 0 only (their outputs are dropped; a row must see something)."""
        if (window, pooled) not in self._masks:
            qpos = self.qpos
            if pooled:
                qpos = qpos.new_zeros(self.pool_rows[1] - self.pool_rows[0], 1)
                qpos[self.slots] = self.qpos
            kpos = torch.arange(self.length, device=qpos.device)[None, :]
            m = kpos <= qpos
            if window:
                m &= kpos > qpos - window
            self._masks[window, pooled] = m[:, None, None, :]
        return self._masks[window, pooled]


@dataclass
class ForwardBatch:
    """Layout of one step.

    ``lengths[i]`` new tokens of sequence ``i`` start at cache position
    ``starts[i]``; ``positions`` is ``[T]`` (the rotary position of each token).
    """

    caches: list[SeqKV]
    starts: list[int]
    lengths: list[int]
    positions: torch.Tensor
    offsets: list[int] = field(init=False)
    _decode: object = field(default=False, init=False, repr=False)  # DecodeGroup once computed (or None)

    def __post_init__(self):
        self.offsets = [0]
        for n in self.lengths:
            self.offsets.append(self.offsets[-1] + n)

    @property
    def num_tokens(self) -> int:
        return self.offsets[-1]

    @classmethod
    def build(cls, caches: list[SeqKV], lengths: list[int], device) -> "ForwardBatch":
        """Step that appends ``lengths[i]`` tokens to each cache after what it already holds."""
        starts = [c.length for c in caches]
        pos = torch.cat([torch.arange(s, s + n, dtype=torch.long) for s, n in zip(starts, lengths)])
        return cls(caches=caches, starts=starts, lengths=lengths, positions=pos.to(device))

    def decode_group(self) -> Optional[DecodeGroup]:
        """The decoding sequences worth attending together (None: fewer than two, or padding
        them to the longest would more than double the keys read); computed once per step."""
        if self._decode is False:
            seqs = [i for i, n in enumerate(self.lengths) if n == 1]
            length = max((self.starts[i] + 1 for i in seqs), default=0)
            keys = sum(self.starts[i] + 1 for i in seqs)
            self._decode = None
            if len(seqs) >= 2 and len(seqs) * length <= 2 * keys:
                rows = [self.offsets[i] for i in seqs]
                first = rows[0] if rows[-1] - rows[0] == len(rows) - 1 else None
                device = self.positions.device
                row_t = torch.tensor(rows, device=device)
                group = DecodeGroup(seqs, row_t, first, length, self.positions[row_t][:, None])
                pool = self.caches[seqs[0]].pool
                if pool is not None and all(self.caches[i].pool is pool for i in seqs):
                    slots = [self.caches[i].slot for i in seqs]
                    # the pool's rows from the group's first to its last are attended, those of other
                    # sequences in between too: only while that at most doubles the keys read
                    lo, hi = min(slots), max(slots) + 1
                    if (hi - lo) * length <= 2 * keys:
                        group.pool, group.pool_rows = pool, (lo, hi)
                        group.slots = torch.tensor(slots, device=device) - lo
                self._decode = group
        return self._decode

    def commit(self) -> None:
        """Make this step's tokens part of each sequence's history."""
        for c, s, n in zip(self.caches, self.starts, self.lengths):
            c.length = s + n

    def last_token_indices(self) -> torch.Tensor:
        """Index of each sequence's last token in the flat ``[T]`` layout."""
        return torch.tensor([o - 1 for o in self.offsets[1:]], dtype=torch.long)
