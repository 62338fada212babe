"""Log-probabilities at prompt positions: the LM head over a prompt's rows, a chunk at a time.

A step that feeds prompt tokens of a sequence with a ``prompt_sink`` also asks the model for
the final hidden states of those rows (``CausalLM.forward(..., hidden_rows=...)``, ``[R, H]``);
:func:`feed_prompt_rows` runs the LM head on them :func:`chunk_rows` rows at a time, so a long
prompt never holds more than :data:`CHUNK_ELEMENTS` logits at once, and hands each chunk's
log-softmax (``[r, vocab]`` float32) with the prompt tokens it predicts to the sink:

- :class:`PromptLogprobs` keeps vLLM's ``prompt_logprobs`` entries (the actual token's logprob
  and rank, and the top k), for ``SamplingParams(prompt_logprobs=k)``;
- :class:`FullDistributions` keeps every row whole (``LLM.next_token_logprobs``, which
  ``moetier eval --kl-base`` compares between two models).

Both runners feed prompts through :func:`~moetier.runtime.step.forward_step`, so both fill a
sink the same way, whether the prompt arrives whole (latency engine) or in chunks (throughput).
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from ..outputs import Logprob

CHUNK_ELEMENTS = 1 << 22  # logits per LM-head chunk: 4 Mi float32 = 16 MiB (plus its log-softmax)


class PromptSink(Protocol):
    def add(self, logp: torch.Tensor, targets: torch.Tensor) -> None:
        """``logp`` ``[r, vocab]``: log-softmax at r consecutive prompt positions; ``targets`` ``[r]``:
        the prompt token that follows each of them."""


def chunk_rows(vocab: int) -> int:
    """Rows of one LM-head chunk for this vocabulary."""
    return max(1, CHUNK_ELEMENTS // vocab)


def prompt_work(seqs, lengths: list[int], batch) -> tuple[list, Optional[torch.Tensor]]:
    """What a step owes the prompt sinks of ``seqs``: the ``work`` list of :func:`feed_prompt_rows`
    and the rows of the flat ``[T]`` layout whose hidden states it needs (None: no work).

    Of the ``n`` prompt tokens a sequence feeds at positions ``start..``, a row is needed for each
    one whose next token is also a prompt token (the last one predicts the first generated token).
    """
    work, rows = [], []
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        if s.prompt_sink is None or s.out.token_ids:  # not asked for, or past its prompt
            continue
        start = batch.starts[i]
        count = max(0, min(n, len(s.prompt_ids) - 1 - start))
        if count:
            work.append((s.prompt_sink, len(rows), s.prompt_ids[start + 1:start + 1 + count]))
            rows.extend(range(batch.offsets[i], batch.offsets[i] + count))
    return work, (torch.tensor(rows, dtype=torch.long) if rows else None)


@torch.inference_mode()
def feed_prompt_rows(model, hidden: torch.Tensor, work: list[tuple[PromptSink, int, list[int]]]) -> None:
    """Run the LM head on ``hidden`` ``[R, H]`` (final-normed rows) and give each sink its rows.

    ``work``: per sink, its first row in ``hidden`` and the prompt tokens its rows predict
    (as many as it has rows, consecutive).
    """
    step = chunk_rows(model.args.vocab_size)
    for sink, first, targets in work:
        for lo in range(0, len(targets), step):
            hi = min(lo + step, len(targets))
            logits = model.head(hidden[first + lo:first + hi]).float()  # [r, vocab]
            logp = torch.log_softmax(logits, dim=-1)
            sink.add(logp, torch.tensor(targets[lo:hi], device=logp.device))


class PromptLogprobs:
    """vLLM's ``prompt_logprobs``: ``entries[0]`` is None, then per prompt token a dict
    ``{token_id: Logprob}`` of the actual token and the ``k`` most likely tokens."""

    def __init__(self, k: int, tokenizer):
        self.k = k
        self.tokenizer = tokenizer
        self.entries: list[Optional[dict[int, Logprob]]] = [None]

    def _text(self, token: int) -> Optional[str]:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else None

    def add(self, logp: torch.Tensor, targets: torch.Tensor) -> None:
        actual = logp.gather(1, targets[:, None])  # [r, 1]
        ranks = ((logp > actual).sum(dim=1) + 1).tolist()
        k = min(self.k, logp.shape[1])
        top_v, top_i = torch.topk(logp, k, dim=1)  # [r, k]
        for t, lp, rank, vals, ids in zip(targets.tolist(), actual[:, 0].tolist(), ranks, top_v.tolist(),
                                          top_i.tolist()):
            entry = {t: Logprob(lp, rank, self._text(t))}
            for r, (i, v) in enumerate(zip(ids, vals), start=1):
                if i not in entry:
                    entry[i] = Logprob(v, r, self._text(i))
            self.entries.append(entry)


class FullDistributions:
    """The whole log-softmax of every prompt position from ``start`` on, in ``rows``
    (``[prompt_len - 1 - start, vocab]``; row ``i`` predicts prompt token ``start + i + 1``)."""

    def __init__(self, prompt_len: int, vocab: int, start: int = 0):
        self.rows = torch.empty(max(0, prompt_len - 1 - start), vocab, dtype=torch.float32)
        self.start = start
        self.seen = 0  # positions handed to add() so far

    def add(self, logp: torch.Tensor, targets: torch.Tensor) -> None:
        skip = min(max(self.start - self.seen, 0), logp.shape[0])  # rows of this chunk before start
        if skip < logp.shape[0]:
            at = self.seen + skip - self.start
            self.rows[at:at + logp.shape[0] - skip] = logp[skip:]
        self.seen += logp.shape[0]
