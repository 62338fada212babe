"""GLM-4.5/4.6/4.7 (``glm4_moe``) and dots.llm1 (``dots1``): GQA attention with DeepSeek-V3's MoE.

Both route as DeepSeek-V3 does (sigmoid scores, ``e_score_correction_bias`` steering the choice,
groups ranked by their two best experts, optional renormalisation, ``routed_scaling_factor``)
and add ``n_shared_experts`` always-on experts; the first ``first_k_dense_replace`` layers are
dense MLPs. GLM rotates only the first ``partial_rotary_factor`` of each head (0.5 by default),
has q/k/v biases iff ``attention_bias`` but never an o_proj bias, and a per-head q/k norm iff
``use_qk_norm``. Its checkpoints carry multi-token-prediction layers past ``num_hidden_layers``,
which the loader skips. dots1 rotates whole heads, always has the per-head q/k norm, an o_proj
bias iff ``attention_bias``, and sliding-window layers by ``layer_types``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from . import Family
from .args import BaseModelArgs
from .decoder import CausalLM, DecoderLayer
from .deepseek import WEIGHTS
from .layers import Attention
from .moe import MLP, Experts, GroupedSigmoidRouter, SparseMoeBlock


@dataclass
class Glm4MoeArgs(BaseModelArgs):
    """``glm4_moe``; field names and defaults as in transformers' Glm4MoeConfig."""

    num_key_value_heads: Optional[int] = 8
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_experts_per_tok: int = 8
    n_shared_experts: Optional[int] = 1
    n_routed_experts: int = 128
    num_local_experts: Optional[int] = None  # transformers' alias for n_routed_experts
    routed_scaling_factor: float = 1.0
    n_group: Optional[int] = 1
    topk_group: Optional[int] = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    use_qk_norm: bool = False
    partial_rotary_factor: Optional[float] = None  # hub configs write it here; transformers 5 in rope_parameters

    def validate(self) -> None:
        if self.num_local_experts is not None:
            self.n_routed_experts = self.num_local_experts
        super().validate()
        factor = self.rope.params.get("partial_rotary_factor", self.partial_rotary_factor)
        self.partial_rotary_factor = 0.5 if factor is None else float(factor)  # transformers' default
        rot = self.rotary_dim()
        if not 0 < rot <= self.head_dim or rot % 2:
            raise ConfigError(
                f"config.json: partial_rotary_factor {self.partial_rotary_factor} of head_dim {self.head_dim} "
                f"gives {rot} rotary dims; it must be even and in 2..head_dim"
            )
        if self.rope.kind == "yarn" and rot != self.head_dim:
            raise ConfigError("config.json: yarn rope with partial_rotary_factor < 1 is not supported")
        if self.n_routed_experts <= 0 or not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise ConfigError(
                f"config.json: num_experts_per_tok {self.num_experts_per_tok} must be in 1..n_routed_experts "
                f"({self.n_routed_experts})"
            )
        groups, top = self.n_group or 1, self.topk_group or 1
        if self.n_routed_experts % groups or not 0 < top <= groups:
            raise ConfigError(
                f"config.json: n_group {groups} must divide n_routed_experts {self.n_routed_experts} and "
                f"topk_group {top} be in 1..n_group"
            )
        if groups > 1 and self.n_routed_experts // groups < 2:
            raise ConfigError("config.json: grouped routing needs at least 2 experts per group")
        if not self.n_shared_experts:
            raise ConfigError(f"config.json: n_shared_experts must be positive, got {self.n_shared_experts!r}")

    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    def attention(self, i: int) -> Attention:
        return Attention(self, i, qk_norm="head" if self.use_qk_norm else None, qkv_bias=self.attention_bias,
                         o_bias=False, rotary_dim=self.rotary_dim())


@dataclass
class Dots1Args(Glm4MoeArgs):
    """``dots1``; defaults as in transformers' Dots1Config."""

    num_key_value_heads: Optional[int] = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    n_shared_experts: Optional[int] = None
    n_routed_experts: int = 0
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    sliding_window: Optional[int] = 4096
    max_window_layers: Optional[int] = 62
    layer_types: Optional[list] = None

    def validate(self) -> None:
        super().validate()
        if self.layer_types is None:  # transformers' rule when config.json lists none
            self.layer_types = [
                "sliding_attention" if self.sliding_window is not None and i >= (self.max_window_layers or 0)
                else "full_attention" for i in range(self.num_hidden_layers)
            ]
        if (not isinstance(self.layer_types, list) or len(self.layer_types) < self.num_hidden_layers
                or not set(self.layer_types) <= {"full_attention", "sliding_attention"}):
            raise ConfigError(
                f"config.json: layer_types should list full_attention/sliding_attention for each of "
                f"{self.num_hidden_layers} layers, got {self.layer_types!r}"
            )
        if "sliding_attention" in self.layer_types and not (self.sliding_window or 0) > 0:
            raise ConfigError(f"config.json: sliding layers need a positive sliding_window, got {self.sliding_window}")

    def rotary_dim(self) -> int:
        return self.head_dim  # transformers' dots1 rotates whole heads, whatever partial_rotary_factor says

    def attention(self, i: int) -> Attention:
        window = self.sliding_window if self.layer_types[i] == "sliding_attention" else None
        return Attention(self, i, qk_norm="head", qkv_bias=self.attention_bias, sliding_window=window)


def build(args: Glm4MoeArgs) -> CausalLM:
    H = args.hidden_size

    def layer(i: int) -> DecoderLayer:
        if not args.is_moe_layer(i):
            return DecoderLayer(args, args.attention(i), MLP(H, args.intermediate_size))
        router = GroupedSigmoidRouter(H, args.n_routed_experts, args.num_experts_per_tok, args.n_group or 1,
                                      args.topk_group or 1, normalize=args.norm_topk_prob)
        moe = SparseMoeBlock(
            router, Experts(args.n_routed_experts, H, args.moe_intermediate_size),
            shared_expert=MLP(H, args.moe_intermediate_size * args.n_shared_experts),
            scaling=args.routed_scaling_factor,
        )
        return DecoderLayer(args, args.attention(i), moe)

    return CausalLM(args, layer)


# checkpoint names as DeepSeek's: mlp.shared_experts, mlp.gate.e_score_correction_bias (kept in float32)
FAMILIES = {
    "glm4_moe": Family(Glm4MoeArgs, build, WEIGHTS),
    "dots1": Family(Dots1Args, build, WEIGHTS),
}
