"""OLMoE: GQA attention with q/k RMSNorm over the whole projection, every layer sparse.

q and k are normalised before the head split (``qk_norm="full"``), then q, k, v
are clamped to ``±clip_qkv`` if the config sets it. Routing is a softmax top-k,
renormalised only if ``norm_topk_prob`` (off by default); there is no shared
expert. transformers ignores any ``sliding_window`` key for OLMoE, and so do we.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from . import Family
from .args import BaseModelArgs
from .decoder import CausalLM, DecoderLayer
from .layers import Attention
from .moe import Experts, SoftmaxTopKRouter, SparseMoeBlock
from .weights_map import WeightMap


@dataclass
class ModelArgs(BaseModelArgs):
    intermediate_size: int = 2048
    num_experts: int = 64
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    clip_qkv: Optional[float] = None
    rms_norm_eps: float = 1e-5
    num_local_experts: Optional[int] = None  # transformers' alias for num_experts

    def validate(self) -> None:
        if self.num_local_experts is not None:
            self.num_experts = self.num_local_experts
        super().validate()
        # q_norm is sized hidden_size in transformers, so the heads must tile it exactly
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ConfigError(
                f"config.json: head_dim {self.head_dim} x num_attention_heads {self.num_attention_heads} "
                f"must equal hidden_size {self.hidden_size} for OLMoE"
            )
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"config.json: num_experts_per_tok {self.num_experts_per_tok} must be in "
                f"1..num_experts ({self.num_experts})"
            )
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            raise ConfigError(f"config.json: clip_qkv must be positive, got {self.clip_qkv}")


WEIGHTS = WeightMap()


def build(args: ModelArgs) -> CausalLM:
    def layer(i: int) -> DecoderLayer:
        attn = Attention(args, i, qk_norm="full", qkv_bias=args.attention_bias, clip_qkv=args.clip_qkv)
        H, E = args.hidden_size, args.num_experts
        moe = SparseMoeBlock(
            SoftmaxTopKRouter(H, E, args.num_experts_per_tok, normalize=args.norm_topk_prob),
            Experts(E, H, args.intermediate_size),
        )
        return DecoderLayer(args, attn, moe)

    return CausalLM(args, layer)


FAMILIES = {"olmoe": Family(ModelArgs, build, WEIGHTS)}
