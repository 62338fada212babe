"""One forward step over some sequences, then sampling: the part both runners share.

The runners differ in which sequences they put in a step and how many of each
one's pending tokens (the latency engine feeds whole prompts; the throughput
runner cuts prompts into chunks); the step itself, the sampler and the stop
rules are this one function, so both give the same tokens for a request.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from .batch import ForwardBatch
from .prompt_logprobs import feed_prompt_rows, prompt_work
from .sampling import TokenChoice, sample
from .sequence import Sequence, StepEvent


class StepHooks(Protocol):
    """Told about each step (the offload runtime: traces, prefetch predictions)."""

    def begin_step(self, keys: list[object], lengths: list[int]) -> None: ...

    def end_step(self) -> None: ...


def forward_step(model, seqs: list[Sequence], lengths: list[int], eos: set[int],
                 hooks: Optional[StepHooks] = None) -> list[StepEvent]:
    """Feed ``lengths[i]`` of ``seqs[i]``'s pending tokens, all in one flat batch (``[T]``).

    A sequence whose pending tokens are all fed this step (its prompt is now in its cache, or
    it is decoding) gets its next token sampled and an event; one still mid-prompt gets neither.
    Every sequence must already have a KV cache.
    """
    device = seqs[0].kv.device
    ids = torch.tensor([t for s, n in zip(seqs, lengths) for t in s.pending[:n]], dtype=torch.long, device=device)
    batch = ForwardBatch.build([s.kv for s in seqs], lengths, device)
    done = [i for i, (s, n) in enumerate(zip(seqs, lengths)) if n == len(s.pending)]
    rows = None if len(done) == len(seqs) else batch.last_token_indices()[done]  # None: every sequence's last
    work, hidden_rows = prompt_work(seqs, lengths, batch)  # prompt_logprobs asked: rows it needs
    if hooks is not None:
        hooks.begin_step(seqs, lengths)
    try:
        if hidden_rows is None:
            logits = model(ids, batch, rows)  # [len(done), vocab] float32
        else:
            logits, hidden = model(ids, batch, rows, hidden_rows=hidden_rows)  # hidden [R, H]
    finally:
        if hooks is not None:
            hooks.end_step()
    if hidden_rows is not None:
        feed_prompt_rows(model, hidden, work)
    batch.commit()
    for s, n in zip(seqs, lengths):
        del s.pending[:n]
    events = []
    sampled = [seqs[i] for i in done]
    active = [s.processor.active for s in sampled]  # penalties, logit_bias, min_tokens, grammar: runtime/logits.py
    greedy = [s.params.greedy and s.params.logprobs is None and not a for s, a in zip(sampled, active)]
    argmax = logits.argmax(dim=-1).tolist() if any(greedy) else None
    for i, s in enumerate(sampled):
        row = s.processor.apply(logits[i], eos) if active[i] else logits[i]
        choice = TokenChoice(argmax[i]) if greedy[i] else sample(row, s.params, s.generator)
        s.append(choice, eos)
        events.append(StepEvent(s, choice.token, s.take_delta()))
    return events
