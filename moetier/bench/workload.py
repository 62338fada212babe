"""What a benchmark runs: requests of prompt token ids, each generating a set number of tokens.

``fixed`` makes ``count`` prompts of ``input_len`` random token ids (seeded, so every
system gets the same ones). A workload file has one ``{"prompt": "...", "max_tokens": N}``
per line (``max_tokens`` optional: ``--output-len``), read with line-numbered errors.
Every request generates exactly its ``max_tokens`` (end-of-sequence is ignored), so the
systems compared do the same work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import torch

from ..errors import BenchError
from ..jsonl import read_prompt_lines
from ..tokenizer import require


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_tokens: int
    eos: bool = False  # stop at end-of-sequence (``--workload task``); else exactly max_tokens


def fixed(vocab_size: int, input_len: int, output_len: int, count: int, seed: int = 0) -> list[Request]:
    """``count`` requests of ``input_len`` random token ids, each generating ``output_len`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_size, (count, input_len), generator=g)  # [count, input_len]
    return [Request(row, output_len) for row in ids.tolist()]


def read_file(path: str | Path, output_len: int) -> list[tuple[str, int]]:
    """``(prompt text, max_tokens)`` of each line of a workload file; a bad line is a BenchError naming it."""
    items = []
    for n, obj in read_prompt_lines(path, BenchError, what="workload"):
        max_tokens = obj.get("max_tokens", output_len)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BenchError(f"{path}:{n}: 'max_tokens' must be a positive integer, got {max_tokens!r}")
        items.append((obj["prompt"], max_tokens))
    if not items:
        raise BenchError(f"{path}: the workload has no prompts")
    return items


def encode(items: list[tuple[str, int]], tokenizer) -> list[Request]:
    """Tokenize a workload file's prompts (as ``LLM.generate`` would)."""
    tok = require(tokenizer, "a workload file of text prompts")
    return [Request(tok.encode(text), max_tokens) for text, max_tokens in items]


def describe(requests: list[Request], source: str) -> dict:
    """The workload as result.json records it."""
    return {"source": source, "prompts": len(requests),
            "mean_input_tokens": mean(len(r.prompt_ids) for r in requests),
            "mean_output_tokens": mean(r.max_tokens for r in requests)}
