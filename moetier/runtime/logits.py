"""What changes a sequence's logits before its token is sampled, as vLLM applies it.

In order: ``logit_bias`` added; ``min_tokens`` blocking EOS and stop tokens until that many
were generated; the repetition penalty (prompt and output tokens: a positive logit divided by
it, a negative one multiplied), then the presence and frequency penalties (output tokens:
``- presence * [count > 0] - frequency * count``); last the structured-output grammar's mask,
so nothing above can let a forbidden token through.

Both runners sample through :func:`~moetier.runtime.step.forward_step`, which asks each
sequence's :class:`LogitsProcessor` whether it is ``active`` (a sequence with none of the above
keeps the plain argmax fast path) and applies it to that sequence's logits row.
"""

from __future__ import annotations

from typing import Optional

import torch

from .sampling import SamplingParams


class LogitsProcessor:
    """One sequence's logits processing; :meth:`accept` is told each token it generates."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], out_ids: list[int], tokenizer):
        self.params = params
        self.prompt_ids = prompt_ids
        self.out_ids = out_ids  # the sequence's generated tokens (the list it appends to)
        self.penalties = params.presence_penalty != 0 or params.frequency_penalty != 0 \
            or params.repetition_penalty != 1
        self.grammar = None
        if params.structured_outputs is not None:
            from .structured import GrammarState

            self.grammar = GrammarState(params.structured_outputs, tokenizer)
        self._bias: Optional[tuple[list[int], list[float]]] = \
            (list(params.logit_bias), list(params.logit_bias.values())) if params.logit_bias else None

    @property
    def active(self) -> bool:
        """Whether the next token's logits need changing (False: sample from them as they are)."""
        return bool(self.penalties or self._bias or self.grammar is not None
                    or len(self.out_ids) < self.params.min_tokens)

    def apply(self, logits: torch.Tensor, eos: set[int]) -> torch.Tensor:
        """The changed copy of ``logits`` ``[vocab]`` (float32)."""
        p = self.params
        logits = logits.float().clone()
        vocab = logits.shape[-1]
        if self._bias is not None:
            ids, vals = self._bias
            keep = [(i, v) for i, v in zip(ids, vals) if 0 <= i < vocab]
            if keep:
                idx = torch.tensor([i for i, _ in keep], device=logits.device)
                logits.index_add_(0, idx, torch.tensor([v for _, v in keep], device=logits.device))
        if len(self.out_ids) < p.min_tokens:
            blocked = [t for t in (*eos, *p.stop_token_ids) if 0 <= t < vocab]
            if blocked:
                logits[torch.tensor(blocked, device=logits.device)] = float("-inf")
        if self.penalties:
            self._penalize(logits)
        if self.grammar is not None:
            self.grammar.mask(logits, eos)
        return logits

    def _penalize(self, logits: torch.Tensor) -> None:
        p, vocab, dev = self.params, logits.shape[-1], logits.device
        out = torch.tensor([t for t in self.out_ids if 0 <= t < vocab], dtype=torch.long, device=dev)
        if p.repetition_penalty != 1:
            seen = torch.zeros(vocab, dtype=torch.bool, device=dev)
            seen[torch.tensor([t for t in self.prompt_ids if 0 <= t < vocab], dtype=torch.long, device=dev)] = True
            seen[out] = True
            scaled = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits.copy_(torch.where(seen, scaled, logits))
        if (p.presence_penalty or p.frequency_penalty) and out.numel():
            counts = torch.bincount(out, minlength=vocab).to(logits.dtype)
            logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)

    def accept(self, token: int) -> None:
        if self.grammar is not None:
            self.grammar.accept(token)

    @property
    def grammar_done(self) -> bool:
        """The grammar is complete and admits no further token."""
        return self.grammar is not None and self.grammar.stopped
