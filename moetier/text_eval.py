"""Perplexity on a text file and, against a reference model, KL divergence and top-1 agreement.

This is what llama.cpp's perplexity tool does with ``--kl-divergence``, in one run with both
models loaded: the text is tokenized and cut into windows of ``ctx`` tokens (the first one
BOS when the tokenizer has one, then ``ctx - 1`` tokens of text; the tail that fills no
window is dropped); each window runs through the model as one prompt and the next-token
distributions of its second half are scored, so every scored token has at least ``ctx / 2``
tokens of context. Per scored position, with ``p`` the reference's distribution and ``q``
the model's:

- ``KL(p || q) = sum_v p(v) (log p(v) - log q(v))`` (nats), reported as mean, standard
  error of the mean, median, 99th percentile and maximum over positions;
- top-1 agreement: the share of positions where both distributions have the same argmax;
- perplexity of each model, ``exp(mean -log q(actual next token))``;
- mean ``|log q(actual) - log p(actual)|``.

Both models' distributions come from :meth:`moetier.LLM.next_token_logprobs`, the same step
that serves ``SamplingParams(prompt_logprobs=k)``. The packaged default text
(``moetier/tasks/eval_text.txt``) is made of the demo model's sentence templates.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from .errors import TaskError
from .tokenizer import require

DEFAULT_CTX = 512  # llama.cpp's perplexity default; lowered to what the models' context holds
GROUP_BYTES = 256 << 20  # kept distributions of the windows one step runs, per model


def default_text() -> Path:
    """The packaged text ``moetier eval --kl-base`` scores when no ``--text`` is given."""
    from .demo import _package_dir

    return _package_dir("tasks") / "eval_text.txt"


def read_text(path: str | Path) -> str:
    """The file's text; a TaskError naming it when it is missing, not UTF-8 or blank."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: text file does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e})") from e
    if not text.strip():
        raise TaskError(f"{path}: the text file is empty")
    return text


def make_windows(tokenizer, text: str, ctx: int, limit: Optional[int] = None, source: str = "the text") -> list[list[int]]:
    """``text`` as windows of ``ctx`` token ids: ``[BOS] + ctx - 1`` text tokens each (``ctx``
    text tokens when the tokenizer has no BOS); at most ``limit`` windows."""
    tok = require(tokenizer, "scoring a text")
    if ctx < 3:
        raise TaskError(f"--ctx must be at least 3 tokens (the second half of a window is scored), got {ctx}")
    if limit is not None and limit < 1:
        raise TaskError(f"limit must be at least 1, got {limit}")
    ids = tok.encode(text, add_special_tokens=False, verbose=False)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    step = ctx - len(bos)
    count = len(ids) // step
    if count == 0:
        raise TaskError(f"{source} has {len(ids)} tokens, fewer than one window of {step} "
                        f"(--ctx {ctx}); give a longer text or a smaller --ctx")
    if limit is not None:
        count = min(count, limit)
    return [bos + ids[i * step:(i + 1) * step] for i in range(count)]


def first_scored(ctx: int) -> int:
    """The first scored row of a window's ``[ctx - 1, vocab]`` distributions: its second half is scored."""
    return ctx // 2


def window_scores(model_logp: torch.Tensor, targets: torch.Tensor,
                  base_logp: Optional[torch.Tensor] = None, rows: int = 64) -> dict[str, torch.Tensor]:
    """Per position (``[N]`` each): the model's NLL of the actual token, and with a base, the base's
    NLL, KL(base || model) and whether the argmaxes agree. ``*_logp``: ``[N, vocab]`` log-softmax.
    KL sums in float64, ``rows`` positions at a time (bounded temporaries for big vocabularies)."""
    out = {"nll": -model_logp.gather(1, targets[:, None])[:, 0].double()}
    if base_logp is not None:
        out["base_nll"] = -base_logp.gather(1, targets[:, None])[:, 0].double()
        out["top1"] = base_logp.argmax(dim=1) == model_logp.argmax(dim=1)
        kl = []
        for lo in range(0, base_logp.shape[0], rows):
            b, m = base_logp[lo:lo + rows].double(), model_logp[lo:lo + rows].double()
            p = b.exp()
            # a token the base gives probability 0 adds nothing (and -inf - -inf must not become nan)
            kl.append(torch.where(p > 0, p * (b - m), torch.zeros((), dtype=b.dtype)).sum(dim=1))
        out["kl"] = torch.cat(kl)
    return out


def windows_per_step(llm, ctx: int) -> int:
    """Windows run together: what one step's token budget holds, their kept distributions (the
    scored half, float32) within :data:`GROUP_BYTES` per model."""
    kept = (ctx - 1 - first_scored(ctx)) * llm.args.vocab_size * 4
    return max(1, min(llm.engine.max_batch_tokens // ctx, llm.engine.max_num_seqs, GROUP_BYTES // kept))


def text_eval(llm, windows: list[list[int]], base=None, use_tqdm: bool = True) -> dict:
    """Score ``llm`` (and, against ``base``, KL and top-1 agreement) on ``windows``; see the module docstring."""
    from tqdm.auto import tqdm

    ctx = len(windows[0])
    first = first_scored(ctx)
    group = min(windows_per_step(m, ctx) for m in (llm, base) if m is not None)
    parts: dict[str, list[torch.Tensor]] = {}
    bar = tqdm(total=len(windows), desc="KL divergence" if base is not None else "perplexity", unit="window",
               disable=not use_tqdm, dynamic_ncols=True)
    for lo in range(0, len(windows), group):
        chunk = windows[lo:lo + group]
        model_logp = llm.next_token_logprobs_batch(chunk, first)  # each [ctx - 1 - first, vocab]
        base_logp = base.next_token_logprobs_batch(chunk, first) if base is not None else [None] * len(chunk)
        for ids, m, b in zip(chunk, model_logp, base_logp):
            for k, v in window_scores(m, torch.tensor(ids[first + 1:]), b).items():
                parts.setdefault(k, []).append(v)
        bar.update(len(chunk))
        if base is not None:
            bar.set_postfix_str(f"mean KL {torch.cat(parts['kl']).mean().item():.4g}", refresh=False)
    bar.close()
    s = {k: torch.cat(v) for k, v in parts.items()}
    n = s["nll"].numel()
    result = {"ctx": ctx, "windows": len(windows), "tokens_scored": n,
              "scored": "second half of each window (at least ctx/2 tokens of context), as llama.cpp's perplexity",
              "perplexity": _round(math.exp(s["nll"].mean().item()))}
    if base is not None:
        kl = s["kl"]
        result.update(
            base_perplexity=_round(math.exp(s["base_nll"].mean().item())),
            kl_divergence={"mean": _round(kl.mean().item()),
                           "stderr": _round(kl.std().item() / math.sqrt(n) if n > 1 else 0.0),
                           "median": _round(kl.median().item()),
                           "p99": _round(torch.quantile(kl, 0.99).item()),
                           "max": _round(kl.max().item())},
            top1_agreement=_round(s["top1"].double().mean().item()),
            mean_abs_delta_logprob=_round((s["nll"] - s["base_nll"]).abs().mean().item()),
        )
    return result


def _round(x: float) -> float:
    """Six significant digits; an exact 0 stays 0."""
    return float(f"{x:.6g}")
