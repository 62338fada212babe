"""Mixtral: GQA attention, every layer a sparse MoE with softmax top-k routing (renormalised)."""

from __future__ import annotations

from dataclasses import dataclass

from . import Family
from .args import BaseModelArgs
from .decoder import CausalLM, DecoderLayer
from .layers import Attention
from .moe import Experts, SoftmaxTopKRouter, SparseMoeBlock
from .weights_map import WeightMap


@dataclass
class ModelArgs(BaseModelArgs):
    intermediate_size: int = 14336
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    DEFAULT_ROPE_THETA = 1e6


WEIGHTS = WeightMap(renames=(("block_sparse_moe.", "mlp."),), expert_names=("w1", "w3", "w2"))


def build(args: ModelArgs) -> CausalLM:
    def layer(i: int) -> DecoderLayer:
        moe = SparseMoeBlock(
            SoftmaxTopKRouter(args.hidden_size, args.num_local_experts, args.num_experts_per_tok, normalize=True),
            Experts(args.num_local_experts, args.hidden_size, args.intermediate_size),
        )
        return DecoderLayer(args, Attention(args, i), moe)

    return CausalLM(args, layer)


FAMILIES = {"mixtral": Family(ModelArgs, build, WEIGHTS)}
