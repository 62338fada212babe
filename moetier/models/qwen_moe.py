"""Qwen2-MoE and Qwen3-MoE: GQA attention, softmax top-k MoE, some layers dense.

Layer ``i`` is sparse unless it is in ``mlp_only_layers`` or ``(i + 1) %
decoder_sparse_step != 0`` (or the model has no experts); dense layers use a
SwiGLU MLP of ``intermediate_size``, experts use ``moe_intermediate_size``.
Routing renormalises the top k only if ``norm_topk_prob``.

Qwen2-MoE adds q/k/v biases (``qkv_bias``) and an always-on shared expert of
``shared_expert_intermediate_size`` scaled by ``sigmoid(shared_expert_gate(x))``.
Qwen3-MoE has no shared expert and no q/k/v bias but RMS-normalises each
q/k head; its config is written with ``num_local_experts`` (transformers 5) or
``num_experts`` (hub checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from ..errors import ConfigError
from . import Family
from .args import BaseModelArgs
from .decoder import CausalLM, DecoderLayer
from .layers import Attention
from .moe import MLP, Experts, SoftmaxTopKRouter, SparseMoeBlock
from .weights_map import WeightMap


@dataclass
class QwenMoeArgs(BaseModelArgs):
    """Fields both Qwen MoE generations share; defaults are Qwen2-MoE's."""

    num_key_value_heads: Optional[int] = 16
    max_position_embeddings: int = 32768
    intermediate_size: int = 5632
    moe_intermediate_size: int = 1408
    num_experts_per_tok: int = 4
    num_experts: int = 60
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: Optional[list] = None
    use_sliding_window: bool = False
    sliding_window: Optional[int] = 4096

    QK_NORM: ClassVar[Optional[str]] = None  # Attention(qk_norm=...)

    def validate(self) -> None:
        super().validate()
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.mlp_only_layers):
            raise ConfigError(
                f"config.json: mlp_only_layers should be a list of layer indices, got {self.mlp_only_layers!r}"
            )
        if self.decoder_sparse_step <= 0:
            raise ConfigError(f"config.json: decoder_sparse_step must be positive, got {self.decoder_sparse_step}")
        if self.num_experts < 0:
            raise ConfigError(f"config.json: num_experts must not be negative, got {self.num_experts}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"config.json: num_experts_per_tok {self.num_experts_per_tok} must be in "
                f"1..num_experts ({self.num_experts})"
            )
        for i in range(self.num_hidden_layers):
            w = self.window(i)
            if w is not None and w <= 0:
                raise ConfigError(f"config.json: layer {i} uses sliding-window attention but sliding_window is {w}")

    def is_sparse(self, layer: int) -> bool:
        """Whether ``layer`` is an MoE block (else a dense MLP), as transformers decides."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def window(self, layer: int) -> Optional[int]:
        """Sliding-window size of ``layer``'s attention, or None for full attention."""
        return self.sliding_window if self.use_sliding_window else None

    def qkv_has_bias(self) -> bool:
        """Whether q/k/v projections have a bias (o_proj follows ``attention_bias``)."""
        return self.attention_bias

    def shared_expert_size(self) -> int:
        """Intermediate size of the always-on shared expert; 0 for none."""
        return 0


@dataclass
class Qwen2MoeArgs(QwenMoeArgs):
    shared_expert_intermediate_size: int = 5632
    qkv_bias: bool = True
    max_window_layers: int = 28
    layer_types: Optional[list] = None

    def validate(self) -> None:
        # Qwen2-MoE reads no attention_bias: q/k/v follow qkv_bias, o_proj never has one.
        self.attention_bias = False
        if self.layer_types is None:  # transformers' rule when config.json lists none
            self.layer_types = [
                "sliding_attention"
                if (i + 1) % 2 and i < self.max_window_layers and self.use_sliding_window
                else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        kinds = {"full_attention", "sliding_attention"}
        if (
            not isinstance(self.layer_types, list)
            or len(self.layer_types) < self.num_hidden_layers
            or not set(self.layer_types) <= kinds
        ):
            raise ConfigError(
                f"config.json: layer_types should list full_attention/sliding_attention for each of "
                f"{self.num_hidden_layers} layers, got {self.layer_types!r}"
            )
        super().validate()

    def window(self, layer: int) -> Optional[int]:
        if self.layer_types[layer] != "sliding_attention":
            return None
        # transformers sets sliding_window to 0 unless use_sliding_window
        return (self.sliding_window or 0) if self.use_sliding_window else 0

    def qkv_has_bias(self) -> bool:
        return self.qkv_bias

    def shared_expert_size(self) -> int:
        return self.shared_expert_intermediate_size


@dataclass
class Qwen3MoeArgs(QwenMoeArgs):
    num_key_value_heads: Optional[int] = 4
    intermediate_size: int = 6144
    moe_intermediate_size: int = 768
    num_experts_per_tok: int = 8
    num_experts: int = 128
    num_local_experts: Optional[int] = None  # the name transformers 5 writes for num_experts

    QK_NORM = "head"

    def validate(self) -> None:
        if self.num_local_experts is not None:
            self.num_experts = self.num_local_experts
        super().validate()


WEIGHTS = WeightMap()


def build_mlp(args: QwenMoeArgs, i: int):
    """Layer ``i``'s feed-forward: a dense SwiGLU, or the sparse MoE block (with the gated shared expert)."""
    H = args.hidden_size
    if not args.is_sparse(i):
        return MLP(H, args.intermediate_size)
    shared = args.shared_expert_size()
    return SparseMoeBlock(
        SoftmaxTopKRouter(H, args.num_experts, args.num_experts_per_tok, normalize=args.norm_topk_prob),
        Experts(args.num_experts, H, args.moe_intermediate_size),
        shared_expert=MLP(H, shared) if shared else None,
        shared_expert_gate=bool(shared),
    )


def build(args: QwenMoeArgs) -> CausalLM:
    def layer(i: int) -> DecoderLayer:
        attn = Attention(args, i, qk_norm=args.QK_NORM, qkv_bias=args.qkv_has_bias(), sliding_window=args.window(i))
        return DecoderLayer(args, attn, build_mlp(args, i))

    return CausalLM(args, layer)


FAMILIES = {
    "qwen2_moe": Family(Qwen2MoeArgs, build, WEIGHTS),
    "qwen3_moe": Family(Qwen3MoeArgs, build, WEIGHTS),
}
