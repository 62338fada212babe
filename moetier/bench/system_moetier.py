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
        self.llm = LLM(model, device=device, dtype=dtype, max_num_seqs=max(slots, 64), **llm_options)
        self.tokenizer = self.llm.tokenizer
        self.dtype = self.llm.engine.dtype
        self.device = self.llm.engine.device

    def run(self, requests: list[Request], slots: int, continuous: bool, bar) -> RunRecord:
        """Generate every request (greedy, exactly ``max_tokens`` each); time every step."""
        engine, record = self.llm.engine, RunRecord()
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
                        engine.add_request(str(i), r.prompt_ids,
                                           SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True))
                        record.submitted(str(i), time.perf_counter())
                        running.add(str(i))
                t = time.perf_counter()
                events = engine.step()
                now = time.perf_counter()
                starts, lengths = layout.pop()
                record.step(now - t, starts, lengths, counts.take_distinct())
                for ev in events:
                    record.token(ev.seq.request_id, now)
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
