"""Calibrating a cascade: which confidence rule separates right from wrong, and which thresholds.

Every model of the cascade answers every item of an exact-match task (greedy, as
``moetier eval`` does: each item may generate its answer's length in tokens plus two), with
its per-token log-probabilities; each model's time per request is measured on the way.
From those answers alone the cascade's accuracy and cost under any thresholds follow
without running it again (:func:`simulate`): a request costs the time per request of every
model it reaches.

:func:`pick_thresholds` chooses, among thresholds whose cascade accuracy is at least the
last (largest) model's accuracy alone minus ``max_drop``, the cheapest (ties: the more
accurate). :func:`separation` measures how well a rule orders right answers above wrong
ones: the ROC AUC (the chance that a random right answer is more confident than a random
wrong one) and the gap between their mean confidences.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence as Seq

from .cascade import (DEFAULT_RULE, ENTROPY_TOP, FILE_VERSION, RULES, CascadeError, check_rule, passes,
                      request_confidence)
from .evaluate import TaskItem
from .runtime.sampling import SamplingParams
from .tokenizer import require

MAX_CANDIDATES = 41  # thresholds tried per level when there are three models or more


@dataclass
class ModelScores:
    """One model's answers to a task: right or wrong, each rule's confidence, time per request."""

    name: str
    correct: list[bool]
    confidence: dict[str, list[float]] = field(default_factory=dict)
    seconds_per_request: float = 0.0
    completions: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    def subset(self, idx: Seq[int]) -> "ModelScores":
        return ModelScores(self.name, [self.correct[i] for i in idx],
                           {r: [c[i] for i in idx] for r, c in self.confidence.items()},
                           self.seconds_per_request, [self.completions[i] for i in idx] if self.completions else [])


def task_params(llm, items: Seq[TaskItem]) -> list[SamplingParams]:
    """Greedy, each answer's length in tokens + 2 (as :func:`moetier.evaluate.evaluate`), with the
    log-probabilities every rule needs."""
    tok = require(llm.get_tokenizer(), "a text task")
    return [SamplingParams(max_tokens=len(tok.encode(it.answer, add_special_tokens=False)) + 2, temperature=0,
                           logprobs=ENTROPY_TOP) for it in items]


def score_model(llm, name: str, items: Seq[TaskItem], mode: str = "auto", use_tqdm: bool = False) -> ModelScores:
    """Run ``llm`` on every item; its correctness, every rule's confidence and its time per request."""
    params = task_params(llm, items)
    t = time.perf_counter()
    outs = llm.generate([it.prompt for it in items], params, use_tqdm=use_tqdm, mode=mode)
    seconds = time.perf_counter() - t
    completions = [o.outputs[0].text.strip() for o in outs]
    return ModelScores(name, [c == it.answer for c, it in zip(completions, items)],
                       {r: [request_confidence(o, r) for o in outs] for r in RULES}, seconds / len(items),
                       completions)


def separation(correct: Seq[bool], confidence: Seq[float]) -> dict:
    """How well ``confidence`` puts right answers above wrong ones: ROC AUC (ties count a half) and
    the mean confidence of each; ``auc`` is None when all answers are right or all wrong."""
    right = [c for c, ok in zip(confidence, correct) if ok]
    wrong = [c for c, ok in zip(confidence, correct) if not ok]
    out = {"right": len(right), "wrong": len(wrong),
           "mean_right": sum(right) / len(right) if right else None,
           "mean_wrong": sum(wrong) / len(wrong) if wrong else None, "auc": None}
    if right and wrong:
        # rank statistic: pairs (right, wrong) ordered correctly, ties a half
        order = sorted([(c, 1) for c in right] + [(c, 0) for c in wrong])
        wins, below, i = 0.0, 0, 0
        while i < len(order):
            j = i
            while j < len(order) and order[j][0] == order[i][0]:
                j += 1
            r = sum(k for _, k in order[i:j])
            w = (j - i) - r
            wins += r * below + 0.5 * r * w
            below += w
            i = j
        out["auc"] = wins / (len(right) * len(wrong))
        out["gap"] = out["mean_right"] - out["mean_wrong"]
    return out


def rank_rules(scores: ModelScores) -> dict[str, dict]:
    """:func:`separation` of every rule on one model's answers, best (highest AUC) first."""
    seps = {r: separation(scores.correct, scores.confidence[r]) for r in RULES}
    return dict(sorted(seps.items(), key=lambda kv: -(kv[1]["auc"] or 0.0)))


def simulate(scores: Seq[ModelScores], rule: str, thresholds: Seq[float]) -> dict:
    """The cascade's accuracy, each model's share of the answers and the time per request, from the
    models' answers to the same items (``scores`` in cascade order)."""
    n = len(scores[0].correct)
    answered = [0] * len(scores)
    reached = [0] * len(scores)
    correct = 0
    for i in range(n):
        for level, s in enumerate(scores):
            reached[level] += 1
            if level == len(scores) - 1 or passes(s.confidence[rule][i], thresholds[level]):
                answered[level] += 1
                correct += s.correct[i]
                break
    seconds = sum(r * s.seconds_per_request for r, s in zip(reached, scores)) / n
    return {"accuracy": correct / n, "answered_share": {s.name: a / n for s, a in zip(scores, answered)},
            "escalated_share": 1 - answered[0] / n, "seconds_per_request": seconds,
            "cost_vs_last": seconds / scores[-1].seconds_per_request if scores[-1].seconds_per_request else None}


def _candidates(values: Seq[float], limit: Optional[int]) -> list[float]:
    """Thresholds worth trying: 0, each distinct confidence (or ``limit`` quantiles of them), 1."""
    distinct = sorted(set(values))
    if limit is not None and len(distinct) > limit:
        distinct = [distinct[round(k * (len(distinct) - 1) / (limit - 1))] for k in range(limit)]
    return [0.0, *distinct, 1.0]


def pick_thresholds(scores: Seq[ModelScores], rule: str, max_drop: float) -> tuple[list[float], dict]:
    """The cheapest thresholds whose cascade accuracy is within ``max_drop`` of the last model's
    alone (ties: the more accurate, then the lower thresholds); with their :func:`simulate` result."""
    check_rule(rule)
    if not 0 <= max_drop <= 1:
        raise CascadeError(f"the accuracy drop must be in [0, 1], got {max_drop}")
    floor = scores[-1].accuracy - max_drop - 1e-12
    limit = None if len(scores) == 2 else MAX_CANDIDATES
    grids = [_candidates(s.confidence[rule], limit) for s in scores[:-1]]
    best = None
    for ts in itertools.product(*grids):
        sim = simulate(scores, rule, ts)
        if sim["accuracy"] < floor:
            continue
        key = (sim["seconds_per_request"], -sim["accuracy"], ts)
        if best is None or key < best[0]:
            best = (key, list(ts), sim)
    assert best is not None  # all thresholds 1: the last model alone always qualifies
    return best[1], best[2]


def split(n: int, holdout: float) -> tuple[list[int], list[int]]:
    """Item indices for calibration and for the held-out check: every k-th item is held out."""
    if not 0 <= holdout < 1:
        raise CascadeError(f"--holdout must be in [0, 1), got {holdout}")
    if holdout == 0:
        return list(range(n)), []
    k = round(1 / holdout)
    held = [i for i in range(n) if i % k == k - 1]
    return [i for i in range(n) if i % k != k - 1], held


def calibrate(scores: Seq[ModelScores], max_drop: float, rule: Optional[str] = None, holdout: float = 0.0,
              task: Optional[str] = None) -> dict:
    """The calibration file's content: thresholds picked on the calibration items, the rules'
    separation there, and (with ``holdout``) the cascade checked on the held-out items."""
    if len(scores) < 2:
        raise CascadeError("a cascade needs at least two models")
    cal_idx, held_idx = split(len(scores[0].correct), holdout)
    cal = [s.subset(cal_idx) for s in scores]
    rule = check_rule(rule or DEFAULT_RULE)
    thresholds, sim = pick_thresholds(cal, rule, max_drop)
    data = {
        "version": FILE_VERSION, "models": [s.name for s in scores], "rule": rule, "thresholds": thresholds,
        "max_accuracy_drop": max_drop, "task": task,
        "calibration": {"items": len(cal_idx), "accuracy_alone": {s.name: s.accuracy for s in cal}, **sim},
        "rules": {s.name: rank_rules(s) for s in cal[:-1]},
        "seconds_per_request": {s.name: s.seconds_per_request for s in scores},
    }
    if held_idx:
        held = [s.subset(held_idx) for s in scores]
        data["held_out"] = {"items": len(held_idx), "accuracy_alone": {s.name: s.accuracy for s in held},
                            **simulate(held, rule, thresholds)}
    return data


def write_calibration(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
