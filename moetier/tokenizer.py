"""Tokenizer loading (transformers supplies it, with the chat template) and incremental detokenizing."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import RequestError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(folder: Path):
    """The folder's tokenizer, or None when the checkpoint ships none (token-id prompts only)."""
    if not any((folder / f).exists() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def require(tokenizer, what: str):
    if tokenizer is None:
        raise RequestError(f"{what} needs a tokenizer, and this model folder has none; pass prompt_token_ids instead")
    return tokenizer


def chat_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's chat template."""
    tok = require(tokenizer, "chat")
    if not getattr(tok, "chat_template", None):
        raise RequestError("this model's tokenizer has no chat template; use generate() with a plain prompt")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tok.encode(text, add_special_tokens=False)


class Detokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding only a short window (``prefix..``) keeps each step O(1), and a delta
    is held back while it ends in an incomplete UTF-8 sequence ("\\ufffd").
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0
        self._read = 0

    def add(self, token: int) -> str:
        """Append ``token``; return the new text it completes (possibly empty)."""
        self.ids.append(token)
        if self.tok is None:
            return ""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip) if ids else ""


def eos_ids(generation_config: dict, config: dict, tokenizer) -> set[int]:
    """EOS ids from generation_config.json, else config.json, else the tokenizer."""
    for src in (generation_config, config):
        value: Optional[object] = src.get("eos_token_id")
        if value is not None:
            return set(value) if isinstance(value, list) else {int(value)}
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return {tokenizer.eos_token_id}
    return set()
