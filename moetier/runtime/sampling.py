"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, seeded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch


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

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
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
