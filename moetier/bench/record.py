"""What a timed run records, whichever system ran it: its steps and each request's token times."""

from __future__ import annotations

from dataclasses import dataclass, field

from .metrics import Step


@dataclass
class RunRecord:
    """The steps of a run, and per request the time to its first token and between its tokens.

    A system calls :meth:`submitted` when it hands a request to the model, :meth:`token`
    when one of its tokens is sampled and :meth:`step` after each forward step.
    """

    steps: list[Step] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)  # seconds, one per request: submitted -> first token
    itl: list[float] = field(default_factory=list)  # seconds between consecutive tokens, all requests
    output_tokens: int = 0
    seconds: float = 0.0  # wall time of the whole run
    _submitted: dict = field(default_factory=dict, repr=False)
    _last: dict = field(default_factory=dict, repr=False)

    def submitted(self, request: object, t: float) -> None:
        self._submitted[request] = t

    def token(self, request: object, t: float) -> None:
        if request in self._last:
            self.itl.append(t - self._last[request])
        else:
            self.ttft.append(t - self._submitted[request])
        self._last[request] = t
        self.output_tokens += 1

    def step(self, seconds: float, starts: list[int], lengths: list[int], experts: list[int]) -> None:
        self.steps.append(Step(seconds, list(starts), list(lengths), experts))
