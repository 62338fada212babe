"""Hunyuan MoE (``hunyuan_v1_moe``): GQA attention with q/k norm after rotary, a shared MLP.

Every layer is sparse: a float32 softmax top-k router (``gate.wg``, k = ``moe_topk``, one value or
one per layer), renormalised, over experts of ``intermediate_size``, plus an always-on shared MLP
of the same size. Each q/k head is RMS-normalised after the rotation (``query_layernorm`` and
``key_layernorm``). q/k/v/o have biases iff ``attention_bias``. Rope ``dynamic`` with an
``alpha`` (NTK-alpha: a larger base, ``theta * alpha ** (d / (d - 2))``) is read as default rope
with that base, as transformers computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from . import Family
from .args import BaseModelArgs
from .decoder import CausalLM, DecoderLayer
from .layers import Attention
from .moe import MLP, Experts, Float32SoftmaxRouter, SparseMoeBlock
from .weights_map import WeightMap


@dataclass
class ModelArgs(BaseModelArgs):
    """Field names and defaults as in transformers' HunYuanMoEV1Config."""

    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    intermediate_size: int = 11008
    num_experts: int = 1
    moe_topk: Any = 1  # an int, or a list of one per layer

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelArgs":
        return super().from_dict(_ntk_alpha_as_default(raw))

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.num_experts, int) or self.num_experts <= 0:
            raise ConfigError(f"config.json: num_experts should be a positive int, got {self.num_experts!r}")
        ks = self.moe_topk if isinstance(self.moe_topk, list) else [self.moe_topk] * self.num_hidden_layers
        if len(ks) < self.num_hidden_layers or not all(
                isinstance(k, int) and not isinstance(k, bool) and 0 < k <= self.num_experts for k in ks):
            raise ConfigError(
                f"config.json: moe_topk should be in 1..num_experts ({self.num_experts}), one value or one per "
                f"layer, got {self.moe_topk!r}"
            )
        self.moe_topk = ks

    def top_k(self, i: int) -> int:
        return self.moe_topk[i]


def _ntk_alpha_as_default(raw: dict) -> dict:
    """Hunyuan's ``{"type": "dynamic", "alpha": a}`` rope: default rope on base ``theta * a**(d/(d-2))``."""
    key = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    rp = dict(raw.get(key) or {})
    kind = rp.get("rope_type", rp.get("type"))
    if kind != "dynamic" or not rp.get("alpha"):
        return raw
    d = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    theta = rp.get("rope_theta", raw.get("rope_theta", 10000.0))
    raw = {k: v for k, v in raw.items() if k not in ("rope_parameters", "rope_scaling")}
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta * rp["alpha"] ** (d / (d - 2))}
    return raw


WEIGHTS = WeightMap(
    renames=(("mlp.gate.wg.", "mlp.gate."), ("mlp.shared_mlp.", "mlp.shared_expert."),
             ("self_attn.query_layernorm.", "self_attn.q_norm."), ("self_attn.key_layernorm.", "self_attn.k_norm.")),
    keep_fp32=("mlp.gate.weight",),
)


def build(args: ModelArgs) -> CausalLM:
    H, E, inter = args.hidden_size, args.num_experts, args.intermediate_size

    def layer(i: int) -> DecoderLayer:
        attn = Attention(args, i, qk_norm="head_after_rope", qkv_bias=args.attention_bias)
        moe = SparseMoeBlock(Float32SoftmaxRouter(H, E, args.top_k(i), normalize=True), Experts(E, H, inter),
                             shared_expert=MLP(H, inter))
        return DecoderLayer(args, attn, moe)

    return CausalLM(args, layer)


FAMILIES = {"hunyuan_v1_moe": Family(ModelArgs, build, WEIGHTS)}
