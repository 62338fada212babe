"""Model registry: Hugging Face ``model_type`` -> the family module that implements it.

Family modules are imported on first use. Each exposes ``FAMILIES``, a dict of
``model_type -> Family``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import ConfigError

if TYPE_CHECKING:
    from .weights_map import WeightMap

_REGISTRY = {
    "mixtral": "mixtral",
    "qwen2_moe": "qwen_moe",
    "qwen3_moe": "qwen_moe",
    "qwen3_next": "qwen3_next",
    "qwen3_5_moe": "qwen3_next",
    "qwen3_5_moe_text": "qwen3_next",
    "olmoe": "olmoe",
    "deepseek_v2": "deepseek",
    "deepseek_v3": "deepseek",
    "glm4_moe": "glm4_moe",
    "dots1": "glm4_moe",
    "ernie4_5_moe": "ernie4_5_moe",
    "granitemoe": "granitemoe",
    "phimoe": "phimoe",
    "hunyuan_v1_moe": "hunyuan_v1_moe",
    "gpt_oss": "gpt_oss",
    "llama4": "llama4",
    "llama4_text": "llama4",
}


@dataclass(frozen=True)
class Family:
    """What the loader needs to know about one model_type."""

    args: type  # a BaseModelArgs subclass
    build: Callable  # args -> CausalLM (called under the meta device)
    weights: "WeightMap"


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_family(model_type: str | None) -> Family:
    """Look up a family; an unknown type is a ConfigError listing the supported ones."""
    if model_type not in _REGISTRY:
        raise ConfigError(
            f"config.json: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(supported_model_types())}"
        )
    module = importlib.import_module(f".{_REGISTRY[model_type]}", __name__)
    return module.FAMILIES[model_type]
