"""The engine: requests in, one forward step at a time, tokens out.

Each step runs every running sequence's pending tokens in one flat batch: a
new sequence's whole prompt (prefill) next to other sequences' single decode
tokens, with no padding. A sequence leaves the batch the step it finishes and a
waiting one takes its place.
"""

from __future__ import annotations

from collections import deque

from ..errors import RequestError
from .kv_cache import SeqKV
from .sampling import SamplingParams
from .sequence import Sequence, StepEvent, make_sequences
from .step import forward_step

__all__ = ["Engine", "Sequence", "StepEvent"]


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
        seqs = make_sequences(request_id, prompt_ids, params, self.tokenizer, self.max_model_len)
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
            # the reservation: min(max_tokens, what the context leaves), never max_tokens as asked
            room = self.max_model_len - len(seq.prompt_ids)
            seq.kv = SeqKV(self.num_layers, len(seq.prompt_ids) + min(seq.params.max_tokens or 256, room),
                           self.device, self.dtype)
            self.running.append(seq)
            budget -= n

    def step(self) -> list[StepEvent]:
        """Run one forward pass over all running sequences and sample one token for each."""
        self._admit()
        if not self.running:
            return []
        seqs = self.running
        events = forward_step(self.model, seqs, [len(s.pending) for s in seqs], self.eos, self.offload)
        self.running = [s for s in seqs if not s.finished]
        for s in seqs:
            if s.finished:
                s.kv = None  # free the cache now, not when the caller lets go
                if self.offload is not None:
                    self.offload.finish(s)
        return events
