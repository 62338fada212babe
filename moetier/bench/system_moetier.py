"""The ``moetier`` system: requests through the engine's step loop, each step timed.

The loop keeps ``slots`` requests in flight: with a fixed batch it submits the next
``slots`` when the last wave has finished; with ``continuous=True`` (``--concurrency``)
it submits a new request as soon as one finishes, and the engine batches whatever is
running into each step (a newcomer's prefill next to the others' decode tokens).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque

from ..evaluate import RoutingCounts
from ..llm import LLM
from ..runtime.sampling import SamplingParams
from .record import RunRecord
from .workload import Request


class MoetierSystem:
    name = "moetier"

    def __init__(self, model: str, device: str, dtype, slots: int, **llm_options):
        # the engine may run more sequences at once than the benchmark's slots (the accuracy task uses that)
        self._attach(LLM(model, device=device, dtype=dtype, max_num_seqs=max(slots, 64), **llm_options))

    def _attach(self, llm) -> None:
        self.llm = llm
        self.tokenizer = self.llm.tokenizer
        self.dtype = self.llm.engine.dtype
        self.device = self.llm.engine.device
        self.outputs: dict = {}  # request id -> its CompletionOutputs, from the last run
        self.submitted: dict = {}  # request id -> when the last run handed it to the engine

    @classmethod
    def wrap(cls, llm) -> "MoetierSystem":
        """A system over an already loaded LLM (the models of a cascade)."""
        system = cls.__new__(cls)
        system._attach(llm)
        return system

    def run(self, requests: list[Request], slots: int, continuous: bool, bar, logprobs=None,
            token_times: dict | None = None) -> RunRecord:
        """Generate every request (greedy, exactly ``max_tokens`` each unless ``Request.eos``); time
        every step. ``logprobs``: also keep each token's log-probability (and this many alternatives);
        ``token_times``: filled with each request's token times."""
        engine, record = self.llm.engine, RunRecord()
        self.outputs, self.submitted = {}, {}
        pending = deque(enumerate(requests))
        running: set[str] = set()
        layout: list = []  # the (starts, lengths) of the step the model runs, from its forward pre-hook
        hook = self.llm.model.register_forward_pre_hook(
            lambda module, args: layout.append((args[1].starts, args[1].lengths)))
        counts = RoutingCounts().attach(self.llm.model)
        t_run = time.perf_counter()
        try:
            while pending or running:
                if continuous or not running:
                    while pending and len(running) < slots:
                        i, r = pending.popleft()
                        seqs = engine.add_request(str(i), r.prompt_ids, SamplingParams(
                            max_tokens=r.max_tokens, temperature=0, ignore_eos=not r.eos, logprobs=logprobs))
                        self.outputs[str(i)] = [s.out for s in seqs]
                        self.submitted[str(i)] = time.perf_counter()
                        record.submitted(str(i), self.submitted[str(i)])
                        running.add(str(i))
                t = time.perf_counter()
                events = engine.step()
                now = time.perf_counter()
                starts, lengths = layout.pop()
                record.step(now - t, starts, lengths, counts.take_distinct())
                for ev in events:
                    record.token(ev.seq.request_id, now)
                    if token_times is not None:
                        token_times.setdefault(ev.seq.request_id, []).append(now)
                    if ev.finished:
                        running.discard(ev.seq.request_id)
                        bar.update(1)
        finally:
            hook.remove()
            counts.detach()
            for rid in running:
                engine.abort(rid)
        record.seconds = time.perf_counter() - t_run
        return record

    @property
    def generator(self) -> LLM:
        """What :func:`moetier.evaluate.evaluate` scores."""
        return self.llm

    def stats(self) -> dict:
        """Expert-cache counters of an offloaded run (empty when every expert is resident)."""
        return self.llm.stats()

    @property
    def quantization(self):
        """The weights' quantization, as result.json records it (see :func:`quantization_of`)."""
        return quantization_of(self.llm)

    def close(self) -> None:
        self.llm.close()


def quantization_of(llm):
    """What ``llm``'s weights are quantized to: ``"none"`` for 16/32-bit weights (result.json has
    their dtype beside it), else ``llm.quantization`` as the loader sets it (the scheme of a
    quantized packed folder, or of quantize-on-load): a short string such as ``"int4"``, or a
    dict (``{"name": ..., "experts": ..., "dense": ...}``), made JSON-safe here. This is the one
    place the benchmark reads it from."""
    q = getattr(llm, "quantization", None)
    if q is None and any(getattr(m, "quant_layout", None) is not None or hasattr(m, "qweight")
                         for m in llm.model.modules()):
        return "quantized (scheme not recorded)"  # quantized modules, but the LLM does not say how
    if q is None or q == "none":
        return "none"
    if dataclasses.is_dataclass(q) and not isinstance(q, type):
        q = dataclasses.asdict(q)
    return json.loads(json.dumps(q, default=str))
