"""Typed model arguments read from a Hugging Face ``config.json``.

Each family declares a dataclass of the fields it uses, with the same names and
defaults as the transformers config class, so a hub ``config.json`` maps onto it
field for field. Unknown keys are ignored; a missing required key or a value of
the wrong type is a :class:`ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from ..errors import ConfigError

_MISSING = dataclasses.MISSING


@dataclass
class RopeArgs:
    """Rotary embedding parameters, normalised from either config style.

    transformers <= 4.x writes ``rope_theta`` and ``rope_scaling``; 5.x writes
    ``rope_parameters`` holding both. ``kind`` is ``default``, ``linear``, ``yarn`` or ``llama3``.
    """

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    params: dict = field(default_factory=dict)

    KINDS: ClassVar[tuple[str, ...]] = ("default", "linear", "yarn")

    @classmethod
    def from_config(cls, raw: dict, default_theta: float, kinds: tuple[str, ...] = KINDS) -> "RopeArgs":
        rp = dict(raw.get("rope_parameters") or {})
        scaling = dict(raw.get("rope_scaling") or {})
        merged = {**scaling, **rp}
        theta = merged.get("rope_theta", raw.get("rope_theta", default_theta))
        kind = merged.get("rope_type", merged.get("type", "default")) or "default"
        if kind not in kinds:
            raise ConfigError(
                f"config.json: rope type {kind!r} is not supported (supported: {', '.join(kinds)})"
            )
        factor = merged.get("factor")
        return cls(theta=float(theta), kind=kind, factor=float(factor) if factor else 1.0, params=merged)


@dataclass
class BaseModelArgs:
    """Fields shared by every decoder-only MoE family."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    rope: RopeArgs = field(default_factory=RopeArgs)

    # rope_theta when config.json names none (the transformers config's default)
    DEFAULT_ROPE_THETA: ClassVar[float] = 10000.0
    ROPE_KINDS: ClassVar[tuple[str, ...]] = RopeArgs.KINDS  # the rope types the family's Rotary computes

    @classmethod
    def from_dict(cls, raw: dict) -> "BaseModelArgs":
        """Build from a parsed ``config.json``; raises ConfigError naming a bad key."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "rope":
                continue
            required = f.default is _MISSING and f.default_factory is _MISSING
            if f.name not in raw or (raw[f.name] is None and required):
                if required:
                    raise ConfigError(f"config.json: required key {f.name!r} is missing")
                continue
            kwargs[f.name] = _coerce(f.name, raw[f.name], f.type)
        args = cls(**kwargs)
        args.rope = RopeArgs.from_config(raw, cls.DEFAULT_ROPE_THETA, cls.ROPE_KINDS)
        args.validate()
        return args

    def layer_caches(self, dtype):
        """What each layer caches per sequence (``runtime/cache_spec.py``): here every layer keeps
        keys and values (DeepSeek's MLA: its latent and rotary key) of every position."""
        from ..runtime.cache_spec import kv

        if getattr(self, "kv_lora_rank", None):
            per_layer = self.kv_lora_rank + self.qk_rope_head_dim
        else:
            per_layer = 2 * self.num_key_value_heads * self.head_dim
        return [kv(per_layer * dtype.itemsize)] * self.num_hidden_layers

    def validate(self) -> None:
        """Check derived sizes; subclasses extend."""
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"config.json: hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.hidden_act not in ("silu", "swish"):
            raise ConfigError(f"config.json: hidden_act {self.hidden_act!r} is not supported (supported: silu)")


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check a JSON value against a field's annotation (as written in the source)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    optional = text.startswith("Optional[")
    base = text[len("Optional["):-1] if optional else text
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config.json: key {name!r} must not be null")
    want = _TYPES.get(base)
    if want is None:  # lists, dicts: trust the family to check
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"config.json: key {name!r} should be {base}, got {value!r}")
    if want is float and not math.isfinite(value):
        raise ConfigError(f"config.json: key {name!r} must be finite, got {value!r}")
    return value
