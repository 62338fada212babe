"""Structured outputs: a grammar (JSON schema, regex, choice, Lark/GBNF) that masks the logits each step.

The grammar engine is llguidance (the ``serve`` extra; ``pip install llguidance``): a Rust
library with no Python dependencies whose per-token mask costs tens of microseconds on a CPU
(measured in ``bench/serve_load.py --structured``), that compiles JSON schemas, regexes and
Lark grammars lazily (no up-front automaton over the vocabulary, so a new schema costs
nothing per request), and that takes a Hugging Face tokenizer as it is. xgrammar, the other
candidate with the same speed class, pulls triton and a TVM runtime into a CPU install;
outlines-core builds an index over the vocabulary per schema up front.

:class:`StructuredOutputsParams` mirrors vLLM's (``json``, ``regex``, ``choice``, ``grammar``,
``json_object``); exactly one must be set.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Optional, Union

from ..errors import RequestError

# compact JSON with the separators OpenAI's own outputs use; flexible whitespace lets a small
# model loop on blanks forever
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class StructuredOutputsParams:
    """What the output must match; vLLM's field names. Exactly one of them is set.

    Attributes:
        json: a JSON schema (dict or its JSON text) the output must validate against.
        regex: a regular expression the whole output must match.
        choice: the output is exactly one of these strings.
        grammar: a Lark grammar (llguidance's dialect; GBNF, with ``::=``, is converted).
        json_object: any JSON object.
    """

    json: Optional[Union[dict, str]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None

    def __post_init__(self):
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        kinds = [k for k in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, grammar, json_object; "
                             f"got {', '.join(kinds) or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(self.json).__name__}")
        for k in ("regex", "grammar"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"structured_outputs.{k} must be a non-empty string")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        self._grammar: Optional[str] = None

    @classmethod
    def of(cls, value: Any) -> "StructuredOutputsParams":
        """From a ``StructuredOutputsParams`` or the dict of one (an API body, a batch line)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs must be an object, got {type(value).__name__}")
        known = {"json", "regex", "choice", "grammar", "json_object"}
        extra = sorted(set(value) - known - {"disable_any_whitespace", "whitespace_pattern", "backend"})
        if extra:
            raise ValueError(f"structured_outputs: unknown field(s) {', '.join(extra)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in value.items() if k in known})

    def grammar_text(self) -> str:
        """The llguidance grammar (its JSON top-level form), checked; RequestError says what is wrong."""
        if self._grammar is None:
            self._grammar = _compile(self)
        return self._grammar


def _lark_string(s: str) -> str:
    return json.dumps(s)  # a Lark string literal is a JSON string


def _compile(p: StructuredOutputsParams) -> str:
    ll = _llguidance()
    if p.json is not None or p.json_object:
        schema = p.json if p.json is not None else {"type": "object"}
        if schema is True:
            schema = {}
        schema = dict(schema, **{"x-guidance": {**_JSON_STYLE, **schema.get("x-guidance", {})}})
        text = json.dumps({"grammars": [{"name": "json_schema", "json_schema": schema}]})
        what = "structured_outputs.json"
    elif p.regex is not None:
        text, what = ll.LLMatcher.grammar_from_regex(p.regex), "structured_outputs.regex"
    elif p.choice is not None:
        text = ll.LLMatcher.grammar_from_lark("start: " + " | ".join(_lark_string(c) for c in p.choice))
        what = "structured_outputs.choice"
    else:
        g = p.grammar
        if "::=" in g:  # GBNF, as llama.cpp and xgrammar take it
            try:
                g = ll.gbnf_to_lark(g)
            except Exception as e:  # noqa: BLE001 - the converter's message is the user's answer
                raise RequestError(f"structured_outputs.grammar: not a valid GBNF grammar: {e}") from None
        text, what = ll.LLMatcher.grammar_from_lark(g), "structured_outputs.grammar"
    failed, messages = ll.LLMatcher.validate_grammar_with_warnings(text)
    if failed:
        raise RequestError(f"{what} cannot be used: {'; '.join(m.strip() for m in messages)}")
    return text


def _llguidance():
    try:
        import llguidance  # noqa: F401
        import llguidance.hf  # noqa: F401
        import llguidance.torch  # noqa: F401
    except ImportError:
        raise RequestError("structured outputs need llguidance: pip install llguidance "
                           "(or moetier's serve extra: pip install -e '.[serve]' from a checkout)") from None
    return llguidance


_tokenizers: dict = {}
_tok_lock = threading.Lock()


def _ll_tokenizer(tokenizer, n_vocab: int, eos: tuple[int, ...]):
    """llguidance's view of ``tokenizer`` (made once per tokenizer, vocabulary size and EOS set)."""
    ll = _llguidance()
    key = (id(tokenizer), n_vocab, eos)
    with _tok_lock:
        hit = _tokenizers.get(key)
        if hit is None or hit[0] is not tokenizer:
            hit = (tokenizer, ll.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=list(eos) or None))
            _tokenizers[key] = hit
        return hit[1]


class GrammarState:
    """One sequence's matcher: the mask before each sample, the token after it."""

    def __init__(self, params: StructuredOutputsParams, tokenizer):
        if tokenizer is None:
            raise RequestError("structured outputs need the model's tokenizer, and this model folder has none")
        self.text = params.grammar_text()  # checked now: a bad grammar fails the request, not a step
        self.tokenizer = tokenizer
        self.matcher = None
        self.bitmask = None

    def mask(self, logits, eos: set[int]):
        """``logits`` ``[vocab]`` (float32, changed in place) with every token the grammar forbids at -inf."""
        import torch

        ll = _llguidance()
        if self.matcher is None:
            n = logits.shape[-1]
            self.matcher = ll.LLMatcher(_ll_tokenizer(self.tokenizer, n, tuple(sorted(eos))), self.text)
            self.bitmask = ll.torch.allocate_token_bitmask(1, n)
        if self.matcher.is_error():
            raise RequestError(f"structured output failed: {self.matcher.get_error()}")
        ll.torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        bits = self.bitmask[0]
        allowed = ((bits[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:logits.shape[-1]]
        logits.masked_fill_(allowed.to(logits.device) == 0, float("-inf"))
        return logits

    def accept(self, token: int) -> None:
        if self.matcher is not None and not self.matcher.is_stopped():
            self.matcher.consume_token(token)

    @property
    def stopped(self) -> bool:
        """The grammar is complete and admits nothing more."""
        return self.matcher is not None and self.matcher.is_stopped()
