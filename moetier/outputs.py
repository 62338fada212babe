"""Results of generation, shaped like vLLM's so code can switch between the two."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


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

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)
