"""Exact-match evaluation on a JSONL task, and how skewed the model's expert routing is.

A task file has one JSON object per line, ``{"prompt": "12+345=", "answer": "357"}``.
An item is correct when the greedy completion of its prompt, stripped of surrounding
whitespace, equals its answer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .errors import TaskError
from .models.moe import SparseMoeBlock
from .runtime.sampling import SamplingParams
from .tokenizer import require


@dataclass(frozen=True)
class TaskItem:
    prompt: str
    answer: str


def load_task(path: str | Path, limit: Optional[int] = None) -> list[TaskItem]:
    """Parse a JSONL task; a bad line is a TaskError naming the file and line number."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise TaskError(f"limit must be at least 1, got {limit}")
    if not path.is_file():
        raise TaskError(f"{path}: task file does not exist")
    items: list[TaskItem] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e})") from e
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise TaskError(f"{path}:{n}: expected an object with 'prompt' and 'answer', got {type(obj).__name__}")
        missing = [k for k in ("prompt", "answer") if k not in obj]
        if missing:
            raise TaskError(f"{path}:{n}: missing key {' and '.join(repr(k) for k in missing)}")
        prompt, answer = obj["prompt"], obj["answer"]
        if not isinstance(prompt, str) or not prompt:
            raise TaskError(f"{path}:{n}: 'prompt' must be a non-empty string")
        if isinstance(answer, bool) or not isinstance(answer, (str, int)):
            raise TaskError(f"{path}:{n}: 'answer' must be a string (or an integer)")
        items.append(TaskItem(prompt, str(answer)))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise TaskError(f"{path}: the task has no items")
    return items


@dataclass
class RoutingCounts:
    """Routed token-slots per expert, per MoE layer, counted while installed as hooks.

    ``counts[layer]`` is ``[E]``: how many (token, top-k slot) pairs chose each expert.
    """

    counts: dict[int, torch.Tensor] = field(default_factory=dict)
    _handles: list = field(default_factory=list, repr=False)

    def attach(self, model) -> "RoutingCounts":
        for i, layer in enumerate(model.model.layers):
            block = getattr(layer, "mlp", None)
            if isinstance(block, SparseMoeBlock):
                self._handles.append(block.gate.register_forward_hook(self._hook(i, block.gate.weight.shape[0])))
        return self

    def _hook(self, layer: int, num_experts: int):
        def count(module, inputs, output):
            _, ids = output  # routers return (weights [T, k], expert ids [T, k])
            c = torch.bincount(ids.reshape(-1), minlength=num_experts).cpu()
            self.counts[layer] = self.counts[layer] + c if layer in self.counts else c

        return count

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
