"""Qwen3-Next and Qwen3.5-MoE: gated DeltaNet linear attention in most layers, gated full attention in the rest.

``layer_types`` (else every ``full_attention_interval``-th layer full, the rest linear) picks
each layer's token mixer:

- ``linear_attention``: :class:`~moetier.models.deltanet.GatedDeltaNet`, a fixed-size state per
  sequence (conv window + recurrent state) instead of keys and values;
- ``full_attention``: GQA whose ``q_proj`` also yields a per-channel output gate
  (``sigmoid``), with zero-centred q/k RMSNorm and rotary on the first
  ``partial_rotary_factor`` of each head.

Every norm is zero-centred (``1 + weight``). The MoE block is Qwen's (:mod:`.qwen_moe`): softmax
top-k and a shared expert scaled by ``sigmoid(shared_expert_gate(x))``. Qwen3.5-MoE
(``qwen3_5_moe_text``, or the text model of a ``qwen3_5_moe`` vision-language checkpoint) splits
the DeltaNet input projections in four, always renormalises the top k and has no dense layers.
The fused native decode path (``models/fused.py``) does not apply to these layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError
from . import Family
from .args import BaseModelArgs
from .decoder import CausalLM, DecoderLayer
from .deltanet import GatedDeltaNet, SplitGatedDeltaNet
from .layers import Attention, Rotary, ZeroCenteredRMSNorm, attend_batch
from .qwen_moe import QwenMoeArgs, build_mlp
from .weights_map import WeightMap

LAYER_KINDS = ("linear_attention", "full_attention")


@dataclass
class Qwen3NextArgs(QwenMoeArgs):
    num_key_value_heads: Optional[int] = 2
    head_dim: Optional[int] = 256
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    layer_types: Optional[list] = None
    full_attention_interval: int = 4
    partial_rotary_factor: float = 0.25

    @classmethod
    def from_dict(cls, raw: dict) -> "BaseModelArgs":
        args = super().from_dict(raw)
        args.partial_rotary_factor = float(args.rope.params.get(
            "partial_rotary_factor", raw.get("partial_rotary_factor", cls.partial_rotary_factor)))
        rot = int(args.head_dim * args.partial_rotary_factor)
        if not 0 < rot <= args.head_dim or rot % 2:
            raise ConfigError(f"config.json: partial_rotary_factor {args.partial_rotary_factor} gives a rotary "
                              f"dim of {rot} for head_dim {args.head_dim} (must be even and positive)")
        return args

    def validate(self) -> None:
        self.use_sliding_window = False
        if self.layer_types is None:  # transformers' rule
            if self.full_attention_interval <= 0:
                raise ConfigError(f"config.json: full_attention_interval must be positive, "
                                  f"got {self.full_attention_interval}")
            self.layer_types = ["linear_attention" if (i + 1) % self.full_attention_interval else "full_attention"
                                for i in range(self.num_hidden_layers)]
        if (not isinstance(self.layer_types, list) or len(self.layer_types) < self.num_hidden_layers
                or not set(self.layer_types) <= set(LAYER_KINDS)):
            raise ConfigError(f"config.json: layer_types should list linear_attention/full_attention for each of "
                              f"{self.num_hidden_layers} layers, got {self.layer_types!r}")
        super().validate()
        for name in ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                     "linear_num_key_heads", "linear_num_value_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(f"config.json: linear_num_value_heads {self.linear_num_value_heads} is not a multiple "
                              f"of linear_num_key_heads {self.linear_num_key_heads}")

    def is_linear(self, layer: int) -> bool:
        return self.layer_types[layer] == "linear_attention"

    def shared_expert_size(self) -> int:
        return self.shared_expert_intermediate_size

    def layer_caches(self, dtype):
        from ..runtime.cache_spec import kv
        from .deltanet import cache_of

        linear = cache_of(self.linear_num_key_heads, self.linear_num_value_heads, self.linear_key_head_dim,
                          self.linear_value_head_dim, self.linear_conv_kernel_dim, dtype)
        full = kv(2 * self.num_key_value_heads * self.head_dim * dtype.itemsize)
        return [linear if self.is_linear(i) else full for i in range(self.num_hidden_layers)]


@dataclass
class Qwen35MoeArgs(Qwen3NextArgs):
    """``Qwen3_5MoeTextConfig``: every layer sparse, top k always renormalised."""

    num_experts: int = 256
    num_experts_per_tok: int = 8

    @classmethod
    def from_dict(cls, raw: dict) -> "BaseModelArgs":
        if isinstance(raw.get("text_config"), dict):  # a vision-language checkpoint: its text model
            text = dict(raw["text_config"])
            if "tie_word_embeddings" in raw:
                text.setdefault("tie_word_embeddings", raw["tie_word_embeddings"])
            raw = {**text, "model_type": raw.get("model_type")}
        return super().from_dict(raw)

    def validate(self) -> None:
        self.mlp_only_layers, self.decoder_sparse_step, self.norm_topk_prob = [], 1, True
        super().validate()


class GatedAttention(Attention):
    """Qwen3-Next's full attention: ``q_proj`` gives each head's queries and then its output gate."""

    def __init__(self, args: Qwen3NextArgs, layer: int):
        super().__init__(args, layer, qk_norm="head", qkv_bias=args.attention_bias)
        H = args.hidden_size
        self.q_proj = torch.nn.Linear(H, 2 * self.hq * self.d, bias=args.attention_bias)
        self.q_norm = ZeroCenteredRMSNorm(self.d, args.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(self.d, args.rms_norm_eps)
        self.rot = int(self.d * args.partial_rotary_factor)
        self.rotary = Rotary(self.rot, args.rope, args.max_position_embeddings)

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.rot == self.d:
            return self.rotary(x, positions)
        return torch.cat([self.rotary(x[..., : self.rot], positions), x[..., self.rot :]], dim=-1)

    def forward(self, x: torch.Tensor, batch) -> torch.Tensor:
        T = x.shape[0]
        q, gate = self.q_proj(x).view(T, self.hq, 2 * self.d).chunk(2, dim=-1)
        q = self.q_norm(q)
        k = self.k_norm(self.k_proj(x).view(T, self.hk, self.d))
        v = self.v_proj(x).view(T, self.hk, self.d)
        q, k = self._rotate(q, batch.positions), self._rotate(k, batch.positions)
        out = attend_batch(batch, self.layer, q, (k, v), self.scale, None)
        return self.o_proj(out * torch.sigmoid(gate.reshape(T, self.hq * self.d)))


def _zero_centred(args: BaseModelArgs):
    """The family's norm (weight stored as offset from 1) as decoder.py's ``Norm`` factory."""
    return lambda dim: ZeroCenteredRMSNorm(dim, args.rms_norm_eps)


class HybridLayer(DecoderLayer):
    """A decoder layer whose token mixer is ``linear_attn`` (DeltaNet) or ``self_attn``, named as the
    checkpoints name them; zero-centred norms."""

    def __init__(self, args: Qwen3NextArgs, mixer: torch.nn.Module, mlp: torch.nn.Module, linear: bool):
        super().__init__(args, mixer, mlp, norm=_zero_centred(args))
        if linear:
            del self.self_attn
            self.linear_attn = mixer
        self.mixer = [mixer]  # a list: not registered twice

    def forward(self, x: torch.Tensor, batch) -> torch.Tensor:
        x = x + self.mixer[0](self.input_layernorm(x), batch)
        return x + self.mlp(self.post_attention_layernorm(x))


WEIGHTS = WeightMap()
# a Qwen3_5MoeForConditionalGeneration checkpoint: the text model under model.language_model
VL_WEIGHTS = WeightMap(renames=(("model.language_model.", "model."),))


def build(args: Qwen3NextArgs) -> CausalLM:
    split = isinstance(args, Qwen35MoeArgs)

    def layer(i: int) -> DecoderLayer:
        linear = args.is_linear(i)
        if linear:
            mixer = (SplitGatedDeltaNet if split else GatedDeltaNet)(args, i)
        else:
            mixer = GatedAttention(args, i)
        return HybridLayer(args, mixer, build_mlp(args, i), linear)

    return CausalLM(args, layer, norm=_zero_centred(args))


FAMILIES = {
    "qwen3_next": Family(Qwen3NextArgs, build, WEIGHTS),
    "qwen3_5_moe_text": Family(Qwen35MoeArgs, build, WEIGHTS),
    "qwen3_5_moe": Family(Qwen35MoeArgs, build, VL_WEIGHTS),
}
