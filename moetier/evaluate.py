"""Exact-match evaluation on a JSONL task, and how skewed the model's expert routing is.

A task file has one JSON object per line, ``{"prompt": "12+345=", "answer": "357"}``.
An item is correct when the greedy completion of its prompt, stripped of surrounding
whitespace, equals its answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .errors import TaskError
from .jsonl import read_prompt_lines
from .runtime.sampling import SamplingParams
from .tokenizer import require


@dataclass(frozen=True)
class TaskItem:
    prompt: str
    answer: str


def load_task(path: str | Path, limit: Optional[int] = None) -> list[TaskItem]:
    """Parse a JSONL task; a bad line is a TaskError naming the file and line number."""
    if limit is not None and limit < 1:
        raise TaskError(f"limit must be at least 1, got {limit}")
    items: list[TaskItem] = []
    for n, obj in read_prompt_lines(path, TaskError, ("prompt", "answer")):
        answer = obj["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int)):
            raise TaskError(f"{path}:{n}: 'answer' must be a string (or an integer)")
        items.append(TaskItem(obj["prompt"], str(answer)))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise TaskError(f"{path}: the task has no items")
    return items


@dataclass
class RoutingCounts:
    """Routed token-slots per expert, per MoE layer, counted while installed as hooks.

    ``counts[layer]`` is ``[E]``: how many (token, top-k slot) pairs chose each expert.
    The hooks read the expert ids each layer's experts module is called with,
    ``experts(x [T, H], ids [T, k], weights [T, k])``: moetier's and transformers'
    MoE blocks both call it that way, so the same counts work on either model.
    """

    counts: dict[int, torch.Tensor] = field(default_factory=dict)
    _handles: list = field(default_factory=list, repr=False)

    def attach(self, model) -> "RoutingCounts":
        for i, layer in enumerate(model.model.layers):
            experts = getattr(getattr(layer, "mlp", None), "experts", None)
            if experts is not None:
                self._handles.append(experts.register_forward_pre_hook(self._hook(i, experts.num_experts)))
        return self

    def _hook(self, layer: int, num_experts: int):
        def count(module, args):
            ids = args[1]  # [T, k] expert ids; transformers may mark a dropped slot with id E
            c = torch.bincount(ids.reshape(-1), minlength=num_experts)[:num_experts].cpu()
            self.counts[layer] = self.counts[layer] + c if layer in self.counts else c

        return count

    def take_distinct(self) -> list[int]:
        """Distinct experts each MoE layer routed to since the last call, in layer order; resets the counts."""
        distinct = [int((c > 0).sum()) for _, c in sorted(self.counts.items())]
        self.counts.clear()
        return distinct

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "RoutingCounts":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def top_share(self, fraction: float = 0.25) -> dict[int, float]:
        """Per layer, the share of routed token-slots that went to the most popular
        ``ceil(fraction * E)`` experts (a uniform router gives about ``fraction``)."""
        out = {}
        for layer, c in sorted(self.counts.items()):
            top = max(1, math.ceil(fraction * c.numel()))
            out[layer] = c.sort(descending=True).values[:top].sum().item() / max(1, c.sum().item())
        return out


def evaluate(llm, items: list[TaskItem], max_tokens: Optional[int] = None, routing: bool = False,
             use_tqdm: bool = True) -> dict:
    """Greedy exact match of ``llm`` on ``items``, batched through ``llm.generate``.

    Each item may generate its answer's length in tokens plus two (room for a stray space
    and EOS) unless ``max_tokens`` is given. With ``routing=True`` the result also holds the
    per-layer top-25% expert share over every token routed (prompts and generated tokens).
    """
    tok = require(llm.get_tokenizer(), "a text task")
    if max_tokens is None:
        params = [SamplingParams(max_tokens=len(tok.encode(it.answer, add_special_tokens=False)) + 2,
                                 temperature=0) for it in items]
    else:
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
    counter = RoutingCounts().attach(llm.model) if routing else None
    try:
        outs = llm.generate([it.prompt for it in items], params, use_tqdm=use_tqdm)
    finally:
        if counter is not None:
            counter.detach()
    completions = [o.outputs[0].text.strip() for o in outs]
    correct = sum(c == it.answer for c, it in zip(completions, items))
    result = {"items": len(items), "correct": correct, "accuracy": correct / len(items)}
    if counter is not None:
        shares = counter.top_share(0.25)
        result["routing"] = {
            "top_experts_share": {str(k): round(v, 4) for k, v in shares.items()},
            "mean_top_experts_share": round(sum(shares.values()) / max(1, len(shares)), 4),
            "top_fraction": 0.25,
            "note": "share of routed token-slots going to the most popular 25% of experts, per layer",
        }
    result["completions"] = completions
    return result
