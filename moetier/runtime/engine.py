"""The engine: requests in, one forward step at a time, tokens out.

Each step runs every running sequence's pending tokens in one flat batch: a
new sequence's whole prompt (prefill) next to other sequences' single decode
tokens, with no padding. A sequence leaves the batch the step it finishes and a
waiting one takes its place.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import RequestError
from ..outputs import CompletionOutput
from ..tokenizer import Detokenizer
from .batch import ForwardBatch
from .kv_cache import SeqKV
from .sampling import SamplingParams, TokenChoice, make_generator, sample


class Sequence:
    """One completion being generated: its tokens, KV cache, sampler state and stop rules."""

    def __init__(self, request_id: str, index: int, prompt_ids: list[int], params: SamplingParams,
                 tokenizer, max_len: int):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_len = max_len
        self.pending = list(prompt_ids)  # tokens the next step feeds
        self.kv: Optional[SeqKV] = None
        self.out = CompletionOutput(index=index, text="", token_ids=[])
        self.detok = Detokenizer(tokenizer, params.skip_special_tokens)
        seed = None if params.seed is None else params.seed + index
        self.generator = None if params.greedy else make_generator(seed)
        self._sent = 0  # characters of out.text already reported
        self._hold = max((len(s) for s in params.stop), default=1) - 1  # could be a stop string's start

    @property
    def finished(self) -> bool:
        return self.out.finish_reason is not None

    def append(self, choice: TokenChoice, eos: set[int]) -> None:
        """Record a sampled token and decide whether the sequence is done."""
        tok, p, out = choice.token, self.params, self.out
        out.token_ids.append(tok)
        if p.logprobs is not None:
            out.logprobs = out.logprobs or []
            out.logprobs.append({"token": tok, "logprob": choice.logprob, "top": choice.top})
        self.pending = [tok]
        out.text += self.detok.add(tok)
        n = len(out.token_ids)
        if n >= p.min_tokens and (tok in p.stop_token_ids or (not p.ignore_eos and tok in eos)):
            out.finish_reason, out.stop_reason = "stop", (tok if tok in p.stop_token_ids else None)
        elif p.stop and self._match_stop():
            pass
        elif (p.max_tokens is not None and n >= p.max_tokens) or len(self.prompt_ids) + n >= self.max_len:
            out.finish_reason = "length"

    def _match_stop(self) -> bool:
        text = self.out.text
        for s in self.params.stop:
            # reported text was held back far enough to hold no stop string, so search what follows it
            i = text.find(s, max(0, self._sent - len(s)))
            if i >= 0:
                keep = i + len(s) if self.params.include_stop_str_in_output else i
                self.out.text = text[:keep]
                self.out.finish_reason, self.out.stop_reason = "stop", s
                return True
        return False

    def take_delta(self) -> str:
        """Text that is final now: all of it when finished, else all but a possible stop-string prefix."""
        end = len(self.out.text) if self.finished else max(self._sent, len(self.out.text) - self._hold)
        delta = self.out.text[self._sent : end]
        self._sent = end
        return delta


@dataclass
class StepEvent:
    """What one step produced for one sequence."""

    seq: Sequence
    token: int
    delta: str

    @property
    def finished(self) -> bool:
        return self.seq.finished


class Engine:
    """Owns the model, the KV caches and the queue; ``step()`` advances every running sequence."""

    def __init__(self, model, tokenizer, eos: set[int], max_model_len: int,
                 max_num_seqs: int = 64, max_batch_tokens: int = 8192, offload=None):
        self.model = model
        self.offload = offload  # OffloadRuntime when experts are offloaded: told about every step
        self.tokenizer = tokenizer
        self.eos = eos
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.num_layers = len(model.model.layers)
        self.vocab_size = model.args.vocab_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> list[Sequence]:
        """Queue ``params.n`` completions of ``prompt_ids``; bad prompts raise RequestError."""
        self.check_prompt(prompt_ids)
        seqs = [Sequence(request_id, i, list(prompt_ids), params, self.tokenizer, self.max_model_len)
                for i in range(params.n)]
        self.waiting.extend(seqs)
        return seqs

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context is {self.max_model_len} "
                f"tokens (max_model_len), which must also hold at least one generated token"
            )
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")

    def abort(self, request_id: str) -> None:
        """Drop a request's sequences wherever they are (e.g. a client went away)."""
        if self.offload is not None:
            for s in self.running:
                if s.request_id == request_id:
                    self.offload.tracer.pop(s)
        self.waiting = deque(s for s in self.waiting if s.request_id != request_id)
        self.running = [s for s in self.running if s.request_id != request_id]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        budget = self.max_batch_tokens
        while self.waiting and len(self.running) < self.max_num_seqs:
            n = len(self.waiting[0].pending)
            if n > budget and budget < self.max_batch_tokens:
                break  # a long prompt waits for the next step rather than overfilling this one
            seq = self.waiting.popleft()
            seq.kv = SeqKV(self.num_layers, len(seq.prompt_ids) + (seq.params.max_tokens or 256), self.device,
                           self.dtype)
            self.running.append(seq)
            budget -= n

    def step(self) -> list[StepEvent]:
        """Run one forward pass over all running sequences and sample one token for each."""
        self._admit()
        if not self.running:
            return []
        seqs = self.running
        ids = torch.tensor([t for s in seqs for t in s.pending], dtype=torch.long, device=self.device)
        batch = ForwardBatch.build([s.kv for s in seqs], [len(s.pending) for s in seqs], self.device)
        if self.offload is not None:
            self.offload.begin_step(seqs, batch.lengths)
        try:
            logits = self.model(ids, batch)  # [len(seqs), vocab] float32
        finally:
            if self.offload is not None:
                self.offload.end_step()
        batch.commit()
        events = []
        greedy = [s.params.greedy and s.params.logprobs is None for s in seqs]
        argmax = logits.argmax(dim=-1).tolist() if any(greedy) else None
        for i, s in enumerate(seqs):
            choice = TokenChoice(argmax[i]) if greedy[i] else sample(logits[i], s.params, s.generator)
            s.append(choice, self.eos)
            events.append(StepEvent(s, choice.token, s.take_delta()))
        self.running = [s for s in seqs if not s.finished]
        for s in seqs:
            if s.finished:
                s.kv = None  # free the cache now, not when the caller lets go
                if self.offload is not None:
                    self.offload.finish(s)
        return events
