"""Results of generation, shaped like vLLM's so code can switch between the two."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Logprob:
    """One token's log-probability at a position, as vLLM's ``Logprob``.

    ``rank`` is 1 for the most likely token (ties share the better rank); ``decoded_token``
    is the token's text (None when the model has no tokenizer).
    """

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class CompletionOutput:
    """One completion of a prompt.

    ``token_ids`` are the generated tokens only; ``finish_reason`` is ``"stop"``
    (EOS, a stop string or stop token) or ``"length"`` (max_tokens or the context).
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None
    logprobs: Optional[list[dict]] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    # with SamplingParams(prompt_logprobs=k): per prompt position, None for the first token, then
    # {token_id: Logprob} holding the actual prompt token and the k most likely ones (vLLM's shape)
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)
