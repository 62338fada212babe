"""The throughput runner: offline generation over many prompts, as many tokens per weight read as fit.

It sits beside the latency :class:`~moetier.runtime.engine.Engine` and composes
with it instead of adding modes to it: it takes the engine's model, tokenizer,
EOS set, context limit and offload runtime, builds the same
:class:`~moetier.runtime.sequence.Sequence` objects and advances them with the
same :func:`~moetier.runtime.step.forward_step` (so sampling, seeds, stop
strings and EOS behave identically). What it owns is the schedule:

- hundreds of sequences per pass, all tokens of a pass in one flat batch (no
  padding), so every dense matmul and every expert runs once per pass on all
  its tokens and each expert's weights are read (and, offloaded, moved) once;
- KV caches reserved up front for each sequence's prompt + max_tokens, and
  sequences admitted only while the reservations fit the planned KV budget; the
  caches are rows of one :class:`~moetier.runtime.kv_cache.KVPool` when a row per
  sequence slot fits the budget, so decode attention reads them in place;
- prompts of joining sequences cut into chunks under a per-pass token budget,
  so joining never stalls the sequences already decoding; a finished sequence
  leaves the pass it finishes and a waiting one joins in its place;
- with offloaded experts, the scan prefetch/eviction of
  :mod:`~moetier.runtime.throughput_offload` on the shared store.

The :class:`~moetier.runtime.planner.Plan` (from the planner) sets the sizes.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterator, Optional

from ..errors import MoetierError
from ..units import fmt_size
from .kv_cache import KVPool, SeqKV
from .planner import Plan, PassShape, Planner
from .sequence import Sequence
from .step import forward_step
from .throughput_offload import scan_offload


@dataclass
class RunReport:
    """What a throughput run did, and how that compares with the plan's prediction."""

    passes: int = 0
    sequences: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    peak_seqs: int = 0
    peak_kv_reserved: int = 0
    kv_pool_bytes: int = 0  # the KV pool's size (0: a cache per sequence)
    expert_bytes_read: int = 0
    shapes: list[PassShape] = field(default_factory=list, repr=False)
    predicted_tok_s: Optional[float] = None
    predicted_s_for_passes_run: Optional[float] = None  # the cost model applied to the passes as they ran

    @property
    def tok_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    @property
    def predicted_tok_s_for_passes_run(self) -> Optional[float]:
        """The cost model's tokens/s for the passes as they ran: unlike the plan's prediction, this
        knows which sequences stopped early (EOS, stop strings) and how the passes were filled."""
        if not self.predicted_s_for_passes_run:
            return None
        return self.generated_tokens / self.predicted_s_for_passes_run

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "shapes"}
        d["measured_tok_s"] = round(self.tok_s, 2)
        d["seconds"] = round(self.seconds, 3)
        if self.predicted_tok_s:
            d["predicted_tok_s"] = round(self.predicted_tok_s, 2)
            d["measured_over_predicted"] = round(self.tok_s / self.predicted_tok_s, 3)
        if self.predicted_s_for_passes_run:
            d["predicted_s_for_passes_run"] = round(self.predicted_s_for_passes_run, 3)
            d["predicted_tok_s_for_passes_run"] = round(self.predicted_tok_s_for_passes_run, 2)
            d["pass_model_error"] = round(self.predicted_s_for_passes_run / self.seconds - 1, 3) if self.seconds else None
        return d

    def summary(self) -> str:
        s = (f"{self.sequences} sequences, {self.generated_tokens} tokens in {self.seconds:.1f} s "
             f"({self.tok_s:.1f} tok/s, {self.passes} passes, up to {self.peak_seqs} sequences per pass)")
        if self.predicted_tok_s:
            s += f"; predicted {self.predicted_tok_s:.1f} tok/s (measured/predicted {self.tok_s / self.predicted_tok_s:.2f})"
        ran = self.predicted_tok_s_for_passes_run
        if ran and self.predicted_tok_s and abs(ran / self.predicted_tok_s - 1) > 0.1:
            s += (f"; {ran:.1f} tok/s for the passes as they ran (the plan assumed every sequence runs to "
                  f"max_tokens)")
        return s


class ThroughputRunner:
    """Runs a list of sequences to completion in planned passes; see the module docstring."""

    def __init__(self, engine, planner: Optional[Planner] = None):
        self.engine = engine
        self.planner = planner
        self.report = RunReport()

    def reserve_tokens(self, seq: Sequence) -> int:
        """KV positions a sequence may fill: its prompt and every token it may generate."""
        new = seq.params.max_tokens or self.engine.max_model_len
        return min(self.engine.max_model_len, len(seq.prompt_ids) + new)

    def run(self, seqs: list[Sequence], plan: Plan) -> Iterator[list[Sequence]]:
        """Advance ``seqs`` pass by pass; after each pass yield the sequences that finished in it.

        Closing the generator early (an error in the consumer) stops the run and puts the
        expert store back as the latency engine had it.
        """
        e = self.engine
        from .cache_spec import seq_bytes

        def need_of(s: Sequence) -> int:  # every layer for what it caches (bounded rings, fixed states)
            return seq_bytes(e.model.args, e.dtype, self.reserve_tokens(s))

        for s in seqs:
            if need_of(s) > plan.kv_budget:
                raise MoetierError(
                    f"a sequence of {self.reserve_tokens(s)} tokens (prompt + max_tokens) needs "
                    f"{fmt_size(need_of(s))} of KV cache, more than the plan's KV budget "
                    f"{fmt_size(plan.kv_budget)}; lower max_tokens or give more memory")
        rep = self.report = RunReport(sequences=len(seqs), prompt_tokens=sum(len(s.prompt_ids) for s in seqs),
                                      predicted_tok_s=plan.predicted_tok_s)
        waiting: deque[Sequence] = deque(seqs)
        running: list[Sequence] = []
        reserved = 0
        store = e.offload.store if e.offload is not None else None
        read0 = store.stats.bytes_disk_to_host if store is not None else 0
        t_start = time.perf_counter()
        # one KV pool row per sequence slot when the longest reservation times the slots fits the
        # budget (decode attention then runs on the pool as it lies); else a cache per sequence
        longest = max((self.reserve_tokens(s) for s in seqs), default=0)
        slots = min(plan.max_seqs, len(seqs))
        row = seq_bytes(e.model.args, e.dtype, longest)
        pool = KVPool(e.num_layers, slots, longest, e.device, e.dtype) \
            if seqs and slots * row <= plan.kv_budget else None
        rep.kv_pool_bytes = slots * row if pool is not None else 0
        ctx = scan_offload(e.offload, plan.expert_slots) if e.offload is not None else nullcontext(None)
        try:
            with ctx as hooks:
                while waiting or running:
                    while waiting and len(running) < plan.max_seqs:
                        need = need_of(waiting[0])
                        if reserved + need > plan.kv_budget:
                            break
                        s = waiting.popleft()
                        s.kv = pool.take() if pool is not None else \
                            SeqKV(e.num_layers, self.reserve_tokens(s), e.device, e.dtype)
                        running.append(s)
                        reserved += need
                    rep.peak_seqs = max(rep.peak_seqs, len(running))
                    rep.peak_kv_reserved = max(rep.peak_kv_reserved, reserved)
                    chosen, lengths = self._schedule(running, plan.prefill_tokens)
                    shape = PassShape(tokens=sum(lengths), rows=0, seqs=len(chosen),
                                      pairs=sum(n * (s.kv.length + n) for s, n in zip(chosen, lengths)),
                                      ctx=sum(s.kv.length + n for s, n in zip(chosen, lengths)),
                                      decode=sum(1 for n in lengths if n == 1),
                                      spans=[(s.kv.length, n) for s, n in zip(chosen, lengths)])
                    events = forward_step(e.model, chosen, lengths, e.eos, hooks)
                    shape.rows = len(events)
                    rep.shapes.append(shape)
                    rep.passes += 1
                    rep.generated_tokens += len(events)
                    finished = [ev.seq for ev in events if ev.finished]
                    if finished:
                        running = [s for s in running if not s.finished]
                        for s in finished:
                            reserved -= need_of(s)
                            s.kv.release()
                            s.kv = None  # free the cache now
                    rep.seconds = time.perf_counter() - t_start
                    yield finished
        finally:
            for s in running:
                s.kv.release()
                s.kv = None
            rep.seconds = time.perf_counter() - t_start
            if store is not None:
                rep.expert_bytes_read = store.stats.bytes_disk_to_host - read0
            if self.planner is not None and rep.shapes:  # the cost model on the passes as they ran
                rep.predicted_s_for_passes_run = self.planner.predict_passes(rep.shapes, plan.expert_slots)

    @staticmethod
    def _schedule(running: list[Sequence], prefill_tokens: int) -> tuple[list[Sequence], list[int]]:
        """This pass's tokens: one for every decoding sequence, then prompt chunks within the budget.

        Prompts are fed in admission order, so the sequence that joined first starts decoding first.
        """
        chosen, lengths = [], []
        budget = prefill_tokens
        for s in running:
            if s.out.token_ids:  # decoding: its prompt is in the cache
                chosen.append(s)
                lengths.append(len(s.pending))
            elif budget > 0:
                n = min(len(s.pending), budget)
                chosen.append(s)
                lengths.append(n)
                budget -= n
        return chosen, lengths
