"""What one forward step computes: a flat list of new tokens from several sequences.

Tokens of all sequences are concatenated (``[T, hidden]``) so that every
projection and every expert runs once on all of them; only attention is split
per sequence, against that sequence's own KV cache. No padding is ever added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kv_cache import SeqKV


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

    def commit(self) -> None:
        """Make this step's tokens part of each sequence's history."""
        for c, s, n in zip(self.caches, self.starts, self.lengths):
            c.length = s + n

    def last_token_indices(self) -> torch.Tensor:
        """Index of each sequence's last token in the flat ``[T]`` layout."""
        return torch.tensor([o - 1 for o in self.offsets[1:]], dtype=torch.long)
