"""Phi-3.5-MoE (``phimoe``): GQA attention, LayerNorm with bias, sparsemixer routing to two experts.

Every layer is sparse with no shared expert; the router is sparsemixer at inference
(:class:`~moetier.models.moe.SparseMixerRouter`, always two experts, ``router_jitter_noise`` its
threshold). Norms are LayerNorms with weight and bias (eps ``rms_norm_eps``); q/k/v/o have biases
iff ``attention_bias``, the LM head iff ``lm_head_bias``. ``sliding_window`` applies to every
layer. Rope is default or ``longrope`` as transformers computes it for Phi-MoE (short factors).
Expert tensors are named as Mixtral's (``block_sparse_moe.experts.N.w1/w3/w2``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from . import Family
from .args import BaseModelArgs
from .decoder import CausalLM, DecoderLayer, layer_norm
from .layers import Attention
from .moe import Experts, SparseMixerRouter, SparseMoeBlock
from .weights_map import WeightMap

log = logging.getLogger(__name__)


@dataclass
class ModelArgs(BaseModelArgs):
    """Field names and defaults as in transformers' PhimoeConfig."""

    num_key_value_heads: Optional[int] = 8
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    intermediate_size: int = 6400
    num_local_experts: int = 16
    num_experts_per_tok: int = 2
    router_jitter_noise: float = 0.01
    sliding_window: Optional[int] = None
    lm_head_bias: bool = False

    DEFAULT_ROPE_THETA = 1e6
    ROPE_KINDS = ("default", "longrope")  # transformers' Phi-MoE computes no other

    def validate(self) -> None:
        super().validate()
        if self.rope.kind == "longrope":
            self._check_longrope()
        if self.num_experts_per_tok != 2:
            raise ConfigError(
                f"config.json: num_experts_per_tok is {self.num_experts_per_tok}, but Phi-MoE's sparsemixer "
                f"routing always picks 2 experts"
            )
        if self.num_local_experts < 2:
            raise ConfigError(f"config.json: num_local_experts must be at least 2, got {self.num_local_experts}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"config.json: sliding_window must be positive, got {self.sliding_window}")


    def _check_longrope(self) -> None:
        """transformers' Phi-MoE rotates by the short factors at every length, times ``short_mscale``, or
        ``long_mscale`` once a forward call reaches past ``original_max_position_embeddings`` (hub
        checkpoints set the two equal). Where they differ, the context is capped at that original length."""
        p = self.rope.params
        short, orig = p.get("short_factor"), p.get("original_max_position_embeddings")
        if not isinstance(short, list) or len(short) != self.head_dim // 2:
            raise ConfigError(f"config.json: longrope short_factor should list head_dim/2 = {self.head_dim // 2} "
                              f"factors, got {short!r}")
        for key in ("short_mscale", "long_mscale"):
            if not isinstance(p.get(key), (int, float)):
                raise ConfigError(f"config.json: longrope {key} should be a number, got {p.get(key)!r}")
        if not isinstance(orig, int) or orig <= 0:
            raise ConfigError(f"config.json: longrope original_max_position_embeddings should be a positive int, "
                              f"got {orig!r}")
        if p["short_mscale"] != p["long_mscale"] and self.max_position_embeddings > orig:
            log.warning("longrope short_mscale != long_mscale: context capped at original_max_position_embeddings "
                        "%d", orig)
            self.max_position_embeddings = orig


# transformers 5's own state dict names the router mlp.router; hub checkpoints block_sparse_moe.gate
WEIGHTS = WeightMap(renames=(("block_sparse_moe.", "mlp."), ("mlp.router.", "mlp.gate.")),
                    expert_names=("w1", "w3", "w2"))


def build(args: ModelArgs) -> CausalLM:
    H, E, norm = args.hidden_size, args.num_local_experts, layer_norm(args)

    def layer(i: int) -> DecoderLayer:
        attn = Attention(args, i, qkv_bias=args.attention_bias, sliding_window=args.sliding_window)
        moe = SparseMoeBlock(SparseMixerRouter(H, E, args.router_jitter_noise), Experts(E, H, args.intermediate_size))
        return DecoderLayer(args, attn, moe, norm=norm)

    return CausalLM(args, layer, norm=norm, lm_head_bias=args.lm_head_bias)


FAMILIES = {"phimoe": Family(ModelArgs, build, WEIGHTS)}
