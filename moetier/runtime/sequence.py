"""A sequence being generated and what a step reports for it; shared by both runners.

The latency :class:`~moetier.runtime.engine.Engine` and the
:class:`~moetier.runtime.throughput.ThroughputRunner` schedule sequences
differently but build, sample and stop them with this same code, so a request
gives the same tokens whichever runner serves it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..outputs import CompletionOutput
from ..tokenizer import Detokenizer
from .kv_cache import SeqKV
from .logits import LogitsProcessor
from .prompt_logprobs import PromptLogprobs
from .sampling import SamplingParams, TokenChoice, make_generator


def make_sequences(request_id: str, prompt_ids: list[int], params: SamplingParams, tokenizer,
                   max_len: int) -> list["Sequence"]:
    """The ``params.n`` completions of one request (completion ``i`` samples with ``seed + i``)."""
    return [Sequence(request_id, i, list(prompt_ids), params, tokenizer, max_len) for i in range(params.n)]


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
        # filled with the prompt's logprobs while the prompt is fed; the request's first completion only
        self.prompt_sink = PromptLogprobs(params.prompt_logprobs, tokenizer) \
            if params.prompt_logprobs is not None and index == 0 else None
        # min_tokens, penalties, logit_bias, a structured-output grammar (a bad grammar raises here)
        self.processor = LogitsProcessor(params, self.prompt_ids, self.out.token_ids, tokenizer)
        self._sent = 0  # characters of out.text already reported
        self._hold = max((len(s) for s in params.stop), default=1) - 1  # could be a stop string's start
        self._confidence = None  # confidence_stop: the running min or sum of the chosen tokens' logprobs

    @property
    def finished(self) -> bool:
        return self.out.finish_reason is not None

    def append(self, choice: TokenChoice, eos: set[int]) -> None:
        """Record a sampled token and decide whether the sequence is done."""
        tok, p, out = choice.token, self.params, self.out
        out.token_ids.append(tok)
        self.processor.accept(tok)
        if p.logprobs is not None:
            out.logprobs = out.logprobs or []
            out.logprobs.append({"token": tok, "logprob": choice.logprob, "top": choice.top})
        self.pending = [tok]
        out.text += self.detok.add(tok)
        n = len(out.token_ids)
        if p.confidence_stop is not None and self._unsure(choice.logprob):
            out.finish_reason, out.stop_reason = "abort", "low_confidence"
        elif n >= p.min_tokens and (tok in p.stop_token_ids or (not p.ignore_eos and tok in eos)):
            out.finish_reason, out.stop_reason = "stop", (tok if tok in p.stop_token_ids else None)
        elif p.stop and n >= p.min_tokens and self._match_stop():
            pass
        elif self.processor.grammar_done:  # the structured output is complete (a model without EOS)
            out.finish_reason = "stop"
        elif (p.max_tokens is not None and n >= p.max_tokens) or len(self.prompt_ids) + n >= self.max_len:
            out.finish_reason = "length"

    def _unsure(self, logprob: float) -> bool:
        """Whether the output's confidence (``confidence_stop``) is now below its threshold. The running min and
        the running sum (summed in token order, as the cascade sums them) of log-probabilities <= 0 only fall, so
        this is the decision the whole output would get."""
        rule, threshold = self.params.confidence_stop
        c = self._confidence
        c = logprob if c is None else (min(c, logprob) if rule == "min" else c + logprob)
        self._confidence = c
        return math.exp(c) < threshold

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
