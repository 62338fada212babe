"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, seeded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

import torch

if TYPE_CHECKING:
    from .structured import StructuredOutputsParams


def _int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    return v


def _float(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a number, got {v!r}")
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _confidence_stop(value, logprobs) -> tuple[str, float]:
    """``(rule, threshold)``, checked: rule "min" or "product", threshold in (0, 1), logprobs asked for."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and value[0] in ("min", "product")
            and isinstance(value[1], (int, float)) and not isinstance(value[1], bool) and 0 < value[1] < 1):
        raise ValueError(f"confidence_stop must be (\"min\" or \"product\", a threshold in (0, 1)), got {value!r}")
    if logprobs is None:
        raise ValueError("confidence_stop needs logprobs (0 or more)")
    return value[0], float(value[1])


def _logit_bias(bias) -> dict[int, float]:
    """``{token id: bias}`` from ints or the string keys of a JSON body; values in [-100, 100]."""
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a map of token id to bias, got {type(bias).__name__}")
    out = {}
    for k, v in bias.items():
        try:
            tok = int(k) if not isinstance(k, bool) and str(k).lstrip("-").isdigit() else None
        except ValueError:
            tok = None
        if tok is None or tok < 0:
            raise ValueError(f"logit_bias: {k!r} is not a token id (a non-negative integer)")
        v = _float(f"logit_bias[{k}]", v)
        if not -100 <= v <= 100:
            raise ValueError(f"logit_bias[{k}] must be in [-100, 100], got {v}")
        out[tok] = v
    return out


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; field names and defaults follow vLLM.

    Attributes:
        n: completions per prompt.
        temperature: 0 means greedy; higher flattens the distribution.
        top_p: keep the smallest set of tokens whose probability sums to ``top_p``.
        top_k: keep the ``top_k`` most likely tokens (``-1`` or ``0``: all).
        seed: per-request seed; the same seed gives the same output, whatever else is batched.
        max_tokens: most tokens to generate (the context length also bounds it).
        min_tokens: generate at least this many before EOS or stop tokens may end the output.
        stop: strings that end the output; the text returned excludes them.
        stop_token_ids: token ids that end the output (kept in ``token_ids``).
        ignore_eos: keep generating past EOS.
        include_stop_str_in_output: keep the matched stop string in the text.
        skip_special_tokens: drop special tokens from the decoded text.
        logprobs: also return the log-probability of each chosen token and this many top alternatives.
        prompt_logprobs: also return, for each prompt token after the first, its log-probability,
            its rank and this many most likely tokens at that position (``RequestOutput.prompt_logprobs``).
        presence_penalty: subtracted from the logit of every token already generated ([-2, 2]).
        frequency_penalty: subtracted once per time a token was already generated ([-2, 2]).
        repetition_penalty: > 1 discourages tokens of the prompt and the output (divides a positive
            logit, multiplies a negative one); 1 is off.
        logit_bias: token id -> value added to its logit ([-100, 100]; -100 all but bans it).
        structured_outputs: a :class:`~moetier.runtime.structured.StructuredOutputsParams` (or its
            dict, e.g. ``{"json": schema}``, ``{"regex": ...}``, ``{"choice": [...]}``) the output must
            match; the grammar masks the logits each step.
        confidence_stop: ``(rule, threshold)`` with rule ``"min"`` or ``"product"`` of the chosen
            tokens' probabilities (moetier's cascades): end the output, ``finish_reason`` ``"abort"``
            and ``stop_reason`` ``"low_confidence"``, as soon as that confidence is below
            ``threshold`` (in (0, 1)) -- it can only fall as tokens are added. Needs ``logprobs``.

    Every field is checked on construction; a ValueError names the field at fault.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Optional[dict[int, float]] = None
    structured_outputs: Optional["StructuredOutputsParams"] = None
    confidence_stop: Optional[tuple] = None

    def __post_init__(self):
        for name in ("n", "top_k", "min_tokens"):
            _int(name, getattr(self, name))
        for name in ("seed", "max_tokens", "logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name))
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            setattr(self, name, _float(name, getattr(self, name)))
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and (not isinstance(self.stop, (list, tuple))
                                      or not all(isinstance(s, str) for s in self.stop)):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = [s for s in (self.stop or []) if s]
        if self.stop_token_ids is not None and (not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids)):
            raise ValueError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled), 0 (disabled) or positive, got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be >= 0, got {self.prompt_logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logit_bias is not None:
            self.logit_bias = _logit_bias(self.logit_bias)
        if self.confidence_stop is not None:
            self.confidence_stop = _confidence_stop(self.confidence_stop, self.logprobs)
        if self.structured_outputs is not None:
            from .structured import StructuredOutputsParams

            self.structured_outputs = StructuredOutputsParams.of(self.structured_outputs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class TokenChoice:
    """One sampled token, with its log-probability and the top alternatives when asked."""

    token: int
    logprob: Optional[float] = None
    top: list[tuple[int, float]] = field(default_factory=list)


def sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> TokenChoice:
    """Pick the next token from ``logits`` ``[vocab]`` (float32)."""
    if params.greedy:
        token = int(torch.argmax(logits))
    else:
        probs = _filtered_probs(logits.float() / params.temperature, params)
        token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
    choice = TokenChoice(token)
    if params.logprobs is not None:
        logp = torch.log_softmax(logits.float(), dim=-1)
        choice.logprob = float(logp[token])
        if params.logprobs:
            vals, ids = torch.topk(logp, min(params.logprobs, logp.shape[-1]))
            choice.top = list(zip(ids.tolist(), vals.tolist()))
    return choice


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Softmax after top-k and top-p filtering (``[vocab]``)."""
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # drop a token when the tokens before it already reach top_p; the top token always stays
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        probs = probs / probs.sum()
    return probs


def make_generator(seed: Optional[int]) -> torch.Generator:
    """A CPU generator for one sequence: seeded when asked, else from the global RNG."""
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
    return g
