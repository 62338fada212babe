"""Granite MoE (``granitemoe``): Mixtral's layout with four multipliers.

The embeddings are multiplied by ``embedding_multiplier``, attention scores by
``attention_multiplier`` (instead of ``1/sqrt(head_dim)``), each residual branch (attention and
MoE) by ``residual_multiplier`` before it is added, and the logits divided by ``logits_scaling``.
Every layer is sparse: a softmax over the top k router logits, no shared expert. Hub checkpoints
store the experts already stacked (``input_linear`` ``[E, 2I, H]``, ``output_linear`` ``[E, H, I]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..runtime.batch import ForwardBatch
from . import Family
from .args import BaseModelArgs
from .decoder import CausalLM, DecoderLayer
from .layers import Attention
from .moe import Experts, SoftmaxTopKRouter, SparseMoeBlock
from .weights_map import WeightMap


@dataclass
class ModelArgs(BaseModelArgs):
    """Field names and defaults as in transformers' GraniteMoeConfig."""

    intermediate_size: int = 11008
    max_position_embeddings: int = 2048
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(
                f"config.json: num_experts_per_tok {self.num_experts_per_tok} must be in "
                f"1..num_local_experts ({self.num_local_experts})"
            )
        if self.logits_scaling == 0:
            raise ConfigError("config.json: logits_scaling must not be 0")


class GraniteDecoderLayer(DecoderLayer):
    """:class:`DecoderLayer` with each residual branch scaled by ``residual_multiplier``."""

    def __init__(self, args: ModelArgs, attn: Attention, mlp: SparseMoeBlock):
        super().__init__(args, attn, mlp)
        self.residual_multiplier = args.residual_multiplier

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        m = self.residual_multiplier
        x = x + self.self_attn(self.input_layernorm(x), batch) * m
        return x + self.mlp(self.post_attention_layernorm(x)) * m


# hub: block_sparse_moe.{input_linear,output_linear,router.layer}; transformers 5: block_sparse_moe.{experts,router}
WEIGHTS = WeightMap(renames=(
    ("block_sparse_moe.input_linear.weight", "mlp.experts.gate_up_proj"),
    ("block_sparse_moe.output_linear.weight", "mlp.experts.down_proj"),
    ("block_sparse_moe.router.layer.", "mlp.gate."),
    ("block_sparse_moe.router.", "mlp.gate."),
    ("block_sparse_moe.", "mlp."),
))


def build(args: ModelArgs) -> CausalLM:
    H, E = args.hidden_size, args.num_local_experts

    def layer(i: int) -> DecoderLayer:
        attn = Attention(args, i, qkv_bias=args.attention_bias, scale=args.attention_multiplier)
        # softmax over the top k logits = the top k of the softmax, renormalised
        moe = SparseMoeBlock(SoftmaxTopKRouter(H, E, args.num_experts_per_tok, normalize=True),
                             Experts(E, H, args.intermediate_size))
        return GraniteDecoderLayer(args, attn, moe)

    return CausalLM(args, layer, embed_scale=args.embedding_multiplier, logits_scale=args.logits_scaling)


FAMILIES = {"granitemoe": Family(ModelArgs, build, WEIGHTS)}
