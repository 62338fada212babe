"""The ``transformers`` system: the same requests through Hugging Face ``generate``.

``generate`` runs a static batch: each wave of ``slots`` requests is left-padded to its
longest prompt and decoded to its longest ``max_tokens``. A streamer is called with the
prompt just before the prefill and with each step's new tokens after it, so the time
between its calls is the time of each step, sampling included. The metrics count the
work the requests need (their real prompt lengths, the tokens they asked for): what
padding adds is the system's own overhead and shows as lower utilization.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from ..evaluate import RoutingCounts
from ..outputs import CompletionOutput, RequestOutput
from ..tokenizer import load_tokenizer
from .record import RunRecord
from .workload import Request


class _StepClock:
    """A ``generate`` streamer that notes the time and the experts routed at each call."""

    def __init__(self, counts: RoutingCounts):
        self.counts = counts
        self.times: list[float] = []
        self.experts: list[list[int]] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        self.experts.append(self.counts.take_distinct())

    def end(self) -> None:
        pass


class TransformersSystem:
    name = "transformers"

    def __init__(self, path: Path, device: str, dtype: Optional[torch.dtype]):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").to(device).eval()
        self.tokenizer = load_tokenizer(path)
        self.dtype = self.model.dtype
        self.device = torch.device(device)
        gen = self.model.generation_config
        eos = gen.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad = gen.pad_token_id if gen.pad_token_id is not None else min(self.eos, default=0)

    @property
    def quantization(self):
        """The checkpoint's quantization (its config's ``quantization_config``), else ``"none"``."""
        qc = getattr(self.model.config, "quantization_config", None)
        if not qc:
            return "none"
        d = qc if isinstance(qc, dict) else qc.to_dict()
        return {k: d[k] for k in ("quant_method", "bits", "group_size") if k in d} or "quantized"

    def _generate(self, prompts: list[list[int]], max_new_tokens: int, stop_at_eos: bool, streamer=None):
        """Greedy ``generate`` of left-padded ``prompts``; returns the new tokens ``[B, max_new_tokens]``."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        with torch.inference_mode():
            out = self.model.generate(
                ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad,
                eos_token_id=sorted(self.eos) if stop_at_eos and self.eos else None, streamer=streamer)
        return out[:, width:].tolist()

    def run(self, requests: list[Request], slots: int, continuous: bool, bar) -> RunRecord:
        """Generate every request (greedy, exactly ``max_tokens`` each) in waves of ``slots``."""
        record = RunRecord()
        counts = RoutingCounts().attach(self.model)
        t_run = time.perf_counter()
        try:
            for w in range(0, len(requests), slots):
                self._wave(requests[w : w + slots], w, record, counts)
                bar.update(min(slots, len(requests) - w))
        finally:
            counts.detach()
        record.seconds = time.perf_counter() - t_run
        return record

    def _wave(self, wave: list[Request], first: int, record: RunRecord, counts: RoutingCounts) -> None:
        clock = _StepClock(counts)
        n = max(r.max_tokens for r in wave)
        t0 = time.perf_counter()
        for i in range(len(wave)):
            record.submitted(first + i, t0)
        self._generate([r.prompt_ids for r in wave], n, stop_at_eos=False, streamer=clock)
        # clock.times[0]: the prompt, just before the prefill; clock.times[j]: token j of each sequence
        lens = [len(r.prompt_ids) for r in wave]
        record.step(clock.times[1] - t0, [0] * len(wave), lens, clock.experts[1])
        for j in range(1, n):  # decode step j feeds token j and samples token j + 1
            live = [i for i, r in enumerate(wave) if j < r.max_tokens]
            record.step(clock.times[j + 1] - clock.times[j], [lens[i] + j - 1 for i in live], [1] * len(live),
                        clock.experts[j + 1])
        for i, r in enumerate(wave):
            for j in range(1, r.max_tokens + 1):
                record.token(first + i, clock.times[j])

    def generate(self, prompts: list[str], params, use_tqdm: bool = False) -> list[RequestOutput]:
        """What :func:`moetier.evaluate.evaluate` needs of an LLM: greedy completions that stop at EOS,
        batched by ``max_tokens``."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        encoded = [self.tokenizer.encode(p) for p in prompts]
        outputs: list = [None] * len(prompts)
        for max_tokens in sorted({p.max_tokens for p in params}):
            group = [i for i, p in enumerate(params) if p.max_tokens == max_tokens]
            for w in range(0, len(group), 64):
                chunk = group[w : w + 64]
                for i, new in zip(chunk, self._generate([encoded[i] for i in chunk], max_tokens, stop_at_eos=True)):
                    toks = new[: next((j + 1 for j, t in enumerate(new) if t in self.eos), len(new))]
                    text = self.tokenizer.decode(toks, skip_special_tokens=True)
                    outputs[i] = RequestOutput(str(i), prompts[i], encoded[i], [CompletionOutput(0, text, toks)])
        return outputs

    def get_tokenizer(self):
        return self.tokenizer

    @property
    def generator(self):
        """What :func:`moetier.evaluate.evaluate` scores: this object, standing in for an LLM."""
        return self

    def stats(self) -> dict:
        return {}  # the whole model is resident

    def close(self) -> None:
        pass
