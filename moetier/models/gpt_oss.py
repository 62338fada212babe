"""gpt-oss: GQA attention with sinks, sliding-window and full layers alternating, every layer sparse.

Attention (``attn_ext.ExtAttention``): q/k/v/o biases (``attention_bias``), a learned sink logit per
head, and on ``sliding_attention`` layers (``layer_types``; by default every even layer) a window of
``sliding_window`` positions whose KV cache is a ring of that size. YaRN rotary by default.

MoE: the router has a bias, takes the top k logits and softmaxes those k. Experts have biases and a
clamped SwiGLU (``swiglu_alpha``, ``swiglu_limit``, ``up + 1``); checkpoints store them ``[E, H, 2I]``
/ ``[E, I, H]`` with gate and up interleaved, or as MXFP4 ``*_blocks`` / ``*_scales`` (the hub's
release), which are read dequantized and kept, exactly, as int8 groups of 32 (weights/views.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from . import Family
from .args import BaseModelArgs
from .attn_ext import ExtAttention
from .decoder import CausalLM, DecoderLayer
from .moe import Experts, SparseMoeBlock, TopKSoftmaxRouter, clamped_swiglu
from .weights_map import WeightMap

# transformers' GptOssConfig rope when config.json names none
_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}
LAYER_KINDS = ("full_attention", "sliding_attention")


@dataclass
class ModelArgs(BaseModelArgs):
    """``gpt_oss``; field names and defaults as in transformers' GptOssConfig."""

    num_key_value_heads: Optional[int] = 8
    head_dim: Optional[int] = 64
    intermediate_size: int = 2880
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    sliding_window: Optional[int] = 128
    layer_types: Optional[list] = None
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    attention_bias: bool = True

    DEFAULT_ROPE_THETA = 150000.0

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelArgs":
        if not raw.get("rope_parameters") and not raw.get("rope_scaling"):
            raw = {**raw, "rope_parameters": {"rope_theta": raw.get("rope_theta", cls.DEFAULT_ROPE_THETA),
                                              **_DEFAULT_ROPE}}
        return super().from_dict(raw)

    def validate(self) -> None:
        super().validate()
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                for i in range(self.num_hidden_layers)]
        if (not isinstance(self.layer_types, list) or len(self.layer_types) < self.num_hidden_layers
                or not set(self.layer_types) <= set(LAYER_KINDS)):
            raise ConfigError(f"config.json: layer_types should list full_attention/sliding_attention for each of "
                              f"{self.num_hidden_layers} layers, got {self.layer_types!r}")
        if "sliding_attention" in self.layer_types[: self.num_hidden_layers] and not (self.sliding_window or 0) > 0:
            raise ConfigError(f"config.json: sliding_window must be positive, got {self.sliding_window!r}")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(f"config.json: num_experts_per_tok {self.num_experts_per_tok} must be in "
                              f"1..num_local_experts ({self.num_local_experts})")
        if self.swiglu_limit <= 0:
            raise ConfigError(f"config.json: swiglu_limit must be positive, got {self.swiglu_limit}")

    def layer_caches(self, dtype):
        """Sliding layers hold at most ``sliding_window`` positions (a ring, ``runtime/cache_spec.py``),
        full layers keys and values of every position."""
        from ..runtime.cache_spec import kv, window

        per = 2 * self.num_key_value_heads * self.head_dim * dtype.itemsize
        return [kv(per) if self.window(i) is None else window(per, self.window(i))
                for i in range(self.num_hidden_layers)]

    def window(self, layer: int) -> Optional[int]:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


WEIGHTS = WeightMap(renames=((".mlp.router.", ".mlp.gate."),), experts_transposed=True, gate_up_interleaved=True)


def build(args: ModelArgs) -> CausalLM:
    H, E = args.hidden_size, args.num_local_experts

    def layer(i: int) -> DecoderLayer:
        attn = ExtAttention(args, i, qkv_bias=args.attention_bias, sinks=True, window=args.window(i))
        moe = SparseMoeBlock(
            TopKSoftmaxRouter(H, E, args.num_experts_per_tok, bias=True),
            Experts(E, H, args.intermediate_size, bias=True, act=clamped_swiglu(args.swiglu_alpha, args.swiglu_limit)),
        )
        return DecoderLayer(args, attn, moe)

    return CausalLM(args, layer)


FAMILIES = {"gpt_oss": Family(ModelArgs, build, WEIGHTS)}
