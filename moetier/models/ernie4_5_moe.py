"""ERNIE 4.5 MoE (``ernie4_5_moe``): GQA attention, softmax routing steered by a correction bias.

Layer ``i`` is sparse iff ``(i + 1) % moe_layer_interval == 0`` and ``moe_layer_start_index <= i
<= moe_layer_end_index`` (-1: the last layer); the others are dense MLPs of ``intermediate_size``.
The router takes a float32 softmax, picks the top k of the probabilities plus
``e_score_correction_bias`` and renormalises the chosen (unbiased) probabilities; sparse layers
add ``moe_num_shared_experts`` always-on experts fused into one MLP. Rotary rotates adjacent
pairs. ``use_bias`` gives every projection (attention, dense and shared MLPs, LM head) a bias.
Embeddings are tied by default. Checkpoint ``mtp*`` tensors are not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from . import Family
from .args import BaseModelArgs
from .decoder import CausalLM, DecoderLayer
from .layers import Attention
from .moe import MLP, BiasedSoftmaxRouter, Experts, SparseMoeBlock
from .weights_map import WeightMap


@dataclass
class ModelArgs(BaseModelArgs):
    """Field names and defaults as in transformers' Ernie4_5_MoeConfig."""

    num_key_value_heads: Optional[int] = 4
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    intermediate_size: int = 12288
    use_bias: bool = False
    moe_intermediate_size: int = 1536
    moe_k: int = 6
    moe_num_experts: int = 64
    num_experts: Optional[int] = None  # transformers' aliases of moe_num_experts and moe_k
    num_experts_per_tok: Optional[int] = None
    moe_num_shared_experts: int = 2
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12

    DEFAULT_ROPE_THETA = 500000.0

    def validate(self) -> None:
        if self.num_experts is not None:
            self.moe_num_experts = self.num_experts
        if self.num_experts_per_tok is not None:
            self.moe_k = self.num_experts_per_tok
        super().validate()
        if self.moe_layer_end_index == -1:
            self.moe_layer_end_index = self.num_hidden_layers - 1
        if self.moe_layer_interval <= 0:
            raise ConfigError(f"config.json: moe_layer_interval must be positive, got {self.moe_layer_interval}")
        if self.moe_num_shared_experts < 0:
            raise ConfigError(f"config.json: moe_num_shared_experts must not be negative, got "
                              f"{self.moe_num_shared_experts}")
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim must be even, got {self.head_dim}")
        sparse = any(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        if sparse and not 0 < self.moe_k <= self.moe_num_experts:
            raise ConfigError(
                f"config.json: moe_k {self.moe_k} must be in 1..moe_num_experts ({self.moe_num_experts})"
            )

    def is_moe_layer(self, i: int) -> bool:
        return (self.moe_num_experts > 0 and (i + 1) % self.moe_layer_interval == 0
                and self.moe_layer_start_index <= i <= self.moe_layer_end_index)


# hub checkpoints keep the bias at mlp.moe_statics, transformers' own state dict at mlp.gate.moe_statics
WEIGHTS = WeightMap(
    renames=(("mlp.gate.moe_statics.", "mlp.gate."), ("mlp.moe_statics.", "mlp.gate."),
             ("mlp.shared_experts.", "mlp.shared_expert.")),
    keep_fp32=("mlp.gate.weight", "mlp.gate.e_score_correction_bias"),
)


def build(args: ModelArgs) -> CausalLM:
    H, bias = args.hidden_size, args.use_bias

    def layer(i: int) -> DecoderLayer:
        attn = Attention(args, i, qkv_bias=bias, o_bias=bias, interleaved_rope=True)
        if not args.is_moe_layer(i):
            return DecoderLayer(args, attn, MLP(H, args.intermediate_size, bias=bias))
        shared = args.moe_num_shared_experts
        moe = SparseMoeBlock(
            BiasedSoftmaxRouter(H, args.moe_num_experts, args.moe_k, args.moe_norm_min),
            Experts(args.moe_num_experts, H, args.moe_intermediate_size),
            shared_expert=MLP(H, args.moe_intermediate_size * shared, bias=bias) if shared else None,
        )
        return DecoderLayer(args, attn, moe)

    return CausalLM(args, layer, lm_head_bias=bias)


FAMILIES = {"ernie4_5_moe": Family(ModelArgs, build, WEIGHTS)}
