"""Confidence cascades across model sizes: the small model answers when it is sure, else the next.

A :class:`Cascade` holds an ordered list of models (smallest first) and one threshold per
model but the last. A request goes to the first model; if that model's confidence in its
own answer passes its threshold, its answer is the reply, otherwise the request moves on
to the next model; the last model answers whatever reaches it (HybridServe's scheme).

Confidence is computed from the answering model's own token probabilities (raw logits,
whatever the sampling temperature) by one of :data:`RULES`:

* ``product``: the probability of the whole answer, ``prod p_t``;
* ``mean``: the mean token probability;
* ``min``: the least probable token's probability;
* ``entropy``: ``exp(-mean H_t)``, ``H_t`` the entropy of the next-token distribution at each
  answer position, estimated from its :data:`ENTROPY_TOP` most likely tokens plus the rest
  of the mass as one bucket (a lower bound of the entropy).

All are in [0, 1], higher is surer. A threshold of 0 accepts every answer, a threshold of 1
(or more) none; in between, an answer passes when its confidence is at least the threshold.
A request with ``n > 1`` completions goes by its least confident completion.

``moetier cascade calibrate`` (:mod:`moetier.cascade_calibrate`) measures the rules on a task
and writes the thresholds to a JSON file that :meth:`Cascade.from_file`, ``moetier serve
--cascade`` and ``moetier batch --cascade`` read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence as Seq, Union

from .errors import MoetierError
from .outputs import RequestOutput
from .runtime.sampling import SamplingParams

RULES = ("product", "mean", "min", "entropy")
# measured on held-out additions by bench/cascade.py (demo-small's answers; see the README)
DEFAULT_RULE = "min"
# the threshold used when none is given: demo-small -> demo calibrated on the addition task
DEFAULT_THRESHOLD = 0.5934
ENTROPY_TOP = 20
FILE_VERSION = 1


class CascadeError(MoetierError, ValueError):
    """A cascade cannot be built or run as given (bad rule, thresholds, or calibration file)."""


@dataclass
class CascadeOutput(RequestOutput):
    """A :class:`~moetier.outputs.RequestOutput` with who answered it and how sure the models were.

    ``model``: the name of the model whose answer this is; ``level``: its place in the cascade
    (0 = the first); ``confidences``: each model's confidence, in order, for the models that
    answered this request (the last model's is None when it was not needed to decide).
    """

    model: str = ""
    level: int = 0
    confidences: list = dataclasses.field(default_factory=list)

    @property
    def confidence(self) -> Optional[float]:
        """The answering model's confidence (None for the last model, which never needs one)."""
        return self.confidences[self.level] if self.level < len(self.confidences) else None


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise CascadeError(f"unknown confidence rule {rule!r}; choose one of {', '.join(RULES)}")
    return rule


def token_confidence(logprobs: list[dict], rule: str) -> float:
    """One completion's confidence from its per-token ``logprobs`` entries (``{"token", "logprob",
    "top"}``, as :class:`~moetier.outputs.CompletionOutput` holds them); 1.0 for an empty answer."""
    check_rule(rule)
    if not logprobs:
        return 1.0
    lps = [float(e["logprob"]) for e in logprobs]
    if rule == "product":
        return math.exp(sum(lps))
    if rule == "mean":
        return sum(math.exp(v) for v in lps) / len(lps)
    if rule == "min":
        return math.exp(min(lps))
    if any(not e.get("top") for e in logprobs):
        raise CascadeError("the entropy rule needs each token's top alternatives (logprobs >= 1)")
    return math.exp(-sum(_entropy(e["top"]) for e in logprobs) / len(logprobs))


def _entropy(top: list) -> float:
    """Entropy (nats) of a distribution known by its most likely tokens; the rest is one bucket."""
    ps = [math.exp(lp) for _, lp in top]
    rest = max(0.0, 1.0 - sum(ps))
    return -sum(p * math.log(p) for p in ps if p > 0) - (rest * math.log(rest) if rest > 0 else 0.0)


def request_confidence(out: RequestOutput, rule: str) -> float:
    """A request's confidence: its least confident completion's."""
    return min(token_confidence(c.logprobs or [], rule) for c in out.outputs)


def passes(confidence: float, threshold: float) -> bool:
    """Whether an answer of this confidence is accepted: 0 accepts all, 1 or more none."""
    return threshold <= 0 or (threshold < 1 and confidence >= threshold)


def scoring_params(params: SamplingParams, rule: str, threshold: Optional[float] = None) -> SamplingParams:
    """``params`` asking for the per-token log-probabilities ``rule`` needs (same tokens sampled). With the
    level's ``threshold``, a ``min`` or ``product`` rule also stops an answer as soon as its confidence has
    fallen below it (``confidence_stop``): the request escalates either way, without the rest of its tokens."""
    want = ENTROPY_TOP if rule == "entropy" else 0
    if params.logprobs is None or params.logprobs < want:
        params = dataclasses.replace(params, logprobs=want)
    if threshold is not None and rule in ("min", "product") and 0 < threshold < 1:
        params = dataclasses.replace(params, confidence_stop=(rule, threshold))
    return params


def _strip(out: RequestOutput, asked: Optional[int]) -> None:
    """Drop the log-probabilities the cascade asked for and the caller did not."""
    for c in out.outputs:
        if asked is None:
            c.logprobs = None
        elif c.logprobs:
            c.logprobs = [{**e, "top": e["top"][:asked]} for e in c.logprobs]


def check_thresholds(thresholds, n_models: int) -> list[float]:
    if isinstance(thresholds, (int, float)):
        thresholds = [float(thresholds)] * (n_models - 1)
    thresholds = [float(t) for t in thresholds]
    if len(thresholds) != n_models - 1:
        raise CascadeError(f"a cascade of {n_models} models needs {n_models - 1} threshold(s) (the last model "
                           f"answers whatever reaches it), got {len(thresholds)}")
    bad = [t for t in thresholds if not 0 <= t <= 1]
    if bad:
        raise CascadeError(f"thresholds must be in [0, 1], got {bad}")
    return thresholds


def read_calibration(path: str | Path) -> dict:
    """A calibration file (``moetier cascade calibrate``): ``{"models", "rule", "thresholds", ...}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CascadeError(f"{path}: no such calibration file (write one with moetier cascade calibrate)") from None
    except (OSError, ValueError) as e:
        raise CascadeError(f"{path}: not a readable calibration file ({e})") from e
    missing = [k for k in ("models", "rule", "thresholds") if k not in (data if isinstance(data, dict) else {})]
    if missing:
        raise CascadeError(f"{path}: a calibration file needs {', '.join(missing)}")
    check_rule(data["rule"])
    check_thresholds(data["thresholds"], len(data["models"]))
    return data


def answered_by(outs: Seq) -> Optional[str]:
    """The model that answered these outputs of one request (the largest, when its prompts went to
    different models); None when they are not a cascade's."""
    levels = [(o.level, o.model) for o in outs if isinstance(o, CascadeOutput)]
    return max(levels)[1] if levels else None


def model_name(model) -> str:
    """The name a cascade reports for a model: what it was loaded as (``demo-small``, a folder name)."""
    given = getattr(getattr(model, "config", None), "model", None) if not isinstance(model, (str, Path)) else model
    given = str(given) if given is not None else "model"
    return given if given.startswith("demo") else Path(given).name or given


PromptType = Union[str, dict, list[int]]


class _CascadePlan:
    """The first model's throughput plan, explained after the cascade's memory split."""

    def __init__(self, plan, name: str, memory):
        self.plan, self.name, self.memory = plan, name, memory

    def explain(self) -> str:
        head = self.memory.explain() + "\n" if self.memory is not None else ""
        return f"{head}{self.name} (every request reaches it): {self.plan.explain()}"

    def __getattr__(self, key):
        return getattr(self.plan, key)


class Cascade:
    """Answer each request with the first model that is confident enough; shaped like :class:`~moetier.LLM`.

    >>> c = Cascade(["demo-small", "demo"], thresholds=[0.8])
    >>> out = c.generate(["12+345="], SamplingParams(max_tokens=6, temperature=0))
    >>> out[0].outputs[0].text, out[0].model

    ``models``: loaded :class:`~moetier.LLM` objects or what to load (``"demo-small"``, a folder),
    smallest first; ``llm_options`` go to each load. ``thresholds``: one per model but the last
    (a single number: the same for all). ``names``: what each answer's ``model`` says (default:
    the names the models were loaded by).
    """

    def __init__(self, models: Seq, thresholds: Union[float, Seq[float]] = DEFAULT_THRESHOLD, rule: str = DEFAULT_RULE,
                 names: Optional[Seq[str]] = None, own_models: bool = False, **llm_options):
        if len(models) < 2:
            raise CascadeError(f"a cascade needs at least two models, got {len(models)}")
        self.rule = check_rule(rule)
        self.thresholds = check_thresholds(thresholds, len(models))
        self.names = list(names) if names is not None else [model_name(m) for m in models]
        if len(self.names) != len(models):
            raise CascadeError(f"got {len(self.names)} names for {len(models)} models")
        self._owned = [own_models or isinstance(m, (str, Path)) for m in models]  # closed by close()
        self.memory_plan = None  # a cascade_memory.MemoryPlan when the models were placed within a budget
        self.models: list = []
        try:
            for m in models:
                self.models.append(self._load(m, llm_options) if isinstance(m, (str, Path)) else m)
        except BaseException:
            self.close()
            raise
        self.answered = [0] * len(self.models)  # requests each model answered, since creation
        self.last_run: Optional[dict] = None  # the throughput runs of the last call, per model
        vocabs = [m.tokenizer.get_vocab() if m.tokenizer is not None else None for m in self.models]
        # token-id prompts mean the same to every model only with one vocabulary
        self.shared_vocab = all(v == vocabs[0] for v in vocabs[1:]) and vocabs[0] is not None

    @property
    def engine(self):
        """The first model's engine: what prompts are checked against (``check_prompt``, ``max_model_len``)."""
        return self.models[0].engine

    @property
    def config(self):
        """The first model's config with ``model`` set to the cascade's name (``A,B``)."""
        return dataclasses.replace(self.models[0].config, model=",".join(self.names))

    def plan(self, prompts, sampling_params=None):
        """The first model's throughput plan for all the prompts (every request reaches it); its
        ``explain()`` starts with the cascade's memory split when there is one."""
        return _CascadePlan(self.models[0].plan(prompts, sampling_params), self.names[0], self.memory_plan)

    @staticmethod
    def _load(model, options: dict):
        from .llm import LLM

        return LLM(model, **options)

    @classmethod
    def from_file(cls, path: str | Path, models: Optional[Seq] = None, **llm_options) -> "Cascade":
        """The cascade a calibration file describes (its models, rule and thresholds); ``models``:
        already loaded ones to use instead of loading the file's. ``device_memory`` in
        ``llm_options``: the whole cascade's budget, divided by :mod:`moetier.cascade_memory`."""
        data = read_calibration(path)
        if models is None and llm_options.get("device_memory") is not None:  # one budget, split by traffic
            from .cascade_cli import open_cascade

            return open_cascade(str(path), **llm_options)
        return cls(models if models is not None else data["models"], data["thresholds"], data["rule"],
                   names=data["models"], **llm_options)

    def close(self) -> None:
        for m, owned in zip(self.models, self._owned):
            if owned:
                m.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def get_tokenizer(self):
        return self.models[0].get_tokenizer()

    @property
    def tokenizer(self):
        return self.models[0].tokenizer

    def stats(self) -> dict:
        """The models' expert-cache counters summed (empty when every model is all-resident)."""
        parts = [m.stats() for m in self.models]
        total: dict = {}
        for part in parts:
            for k, v in part.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
        if "hits" in total and "misses" in total:
            total["hit_rate"] = round(total["hits"] / max(1, total["hits"] + total["misses"]), 4)
        return total

    def shares(self) -> dict[str, float]:
        """The share of requests each model has answered since the cascade was made."""
        total = sum(self.answered) or 1
        return {n: a / total for n, a in zip(self.names, self.answered)}

    def generate(self, prompts: Union[PromptType, Seq[PromptType]],
                 sampling_params: Union[SamplingParams, Seq[SamplingParams], None] = None,
                 use_tqdm: bool = True, mode: str = "auto") -> list[CascadeOutput]:
        """Like :meth:`LLM.generate <moetier.LLM.generate>`: one :class:`CascadeOutput` per prompt, in order.

        Each model runs the requests that reach it as one call (``mode`` as in ``LLM.generate``:
        ``"throughput"`` makes each model's share one planned throughput run, the dataflow of
        ``moetier batch --cascade``)."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        return self._cascade(lambda level, i: prompts[i], len(prompts), sampling_params, use_tqdm, mode)

    def chat(self, messages: Union[list[dict], list[list[dict]]],
             sampling_params: Union[SamplingParams, Seq[SamplingParams], None] = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, mode: str = "auto") -> list[CascadeOutput]:
        """Like :meth:`LLM.chat <moetier.LLM.chat>`; each model renders the conversation with its own template."""
        from .tokenizer import chat_prompt

        convs = [messages] if messages and isinstance(messages[0], dict) else messages

        def prompt(level: int, i: int) -> dict:
            return {"prompt_token_ids": chat_prompt(self.models[level].tokenizer, convs[i], add_generation_prompt)}

        return self._cascade(prompt, len(convs), sampling_params, use_tqdm, mode)

    def iter_generate(self, prompts: Seq[PromptType],
                      sampling_params: Union[SamplingParams, Seq[SamplingParams], None] = None,
                      mode: str = "throughput", use_tqdm: bool = False) -> Iterator[tuple[int, CascadeOutput]]:
        """Like :meth:`LLM.iter_generate <moetier.LLM.iter_generate>`: ``(index, output)`` pairs, the
        first model's accepted answers as soon as its run ends, then the next model's."""
        prompts = list(prompts)
        for _, answered in self.iter_levels(lambda level, i: prompts[i], len(prompts), sampling_params,
                                            use_tqdm, mode):
            yield from answered

    def iter_levels(self, prompt, count: int, sampling_params, use_tqdm: bool = False, mode: str = "auto"
                    ) -> Iterator[tuple[int, list[tuple[int, CascadeOutput]]]]:
        """Run the cascade level by level: yield ``(level, [(index, output), ...])`` with the requests
        that level's model answered, as soon as its run ends. ``prompt(level, i)``: request ``i``'s
        prompt for that level's model."""
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * count
        if len(params_list) != count:
            raise ValueError(f"got {len(params_list)} sampling params for {count} prompts")
        pending = list(range(count))
        confs: dict[int, list] = {i: [] for i in pending}
        last = len(self.models) - 1
        self.last_run = {"models": {}}
        for level, llm in enumerate(self.models):
            if not pending:
                return
            asked = [params_list[i] for i in pending]
            run = asked if level == last else [scoring_params(p, self.rule, self.thresholds[level]) for p in asked]
            level_prompts = [prompt(level, i) for i in pending]
            if level and not self.shared_vocab and any(not isinstance(p, str) for p in level_prompts):
                raise CascadeError("the cascade's models have different vocabularies, so token-id prompts "
                                   "cannot move from one to the next; pass text prompts (or use chat)")
            llm.last_run = None
            outs = llm.generate(level_prompts, run, use_tqdm, mode=mode)
            self.last_run["models"][self.names[level]] = {"requests": len(pending), **(llm.last_run or {})}
            self._sum_runs()
            answered, escalated = [], []
            for i, out, p in zip(pending, outs, asked):
                conf = request_confidence(out, self.rule) if level < last else None
                confs[i].append(conf)
                if level == last or passes(conf, self.thresholds[level]):
                    if level < last:
                        _strip(out, p.logprobs)
                    fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(RequestOutput)}
                    answered.append((i, CascadeOutput(**{**fields, "request_id": str(i)}, model=self.names[level],
                                                      level=level, confidences=confs[i])))
                else:
                    escalated.append(i)
            self.answered[level] += len(answered)
            pending = escalated
            yield level, answered

    def _sum_runs(self) -> None:
        """``last_run``'s totals over the models' throughput runs (``moetier batch`` prints them)."""
        runs = [r for r in self.last_run["models"].values() if "seconds" in r]
        if runs:
            tokens, secs = sum(r.get("generated_tokens", 0) for r in runs), sum(r["seconds"] for r in runs)
            predicted_s = sum(r["generated_tokens"] / r["predicted_tok_s"] for r in runs if r.get("predicted_tok_s"))
            self.last_run.update(generated_tokens=tokens, seconds=secs, measured_tok_s=tokens / secs if secs else 0.0,
                                 predicted_tok_s=tokens / predicted_s if predicted_s else 0.0)

    def _cascade(self, prompt, count: int, sampling_params, use_tqdm: bool, mode: str) -> list[CascadeOutput]:
        results: list = [None] * count
        for _, answered in self.iter_levels(prompt, count, sampling_params, use_tqdm, mode):
            for i, out in answered:
                results[i] = out
        return results
