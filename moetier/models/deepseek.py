"""DeepSeek-V2 and -V3: multi-head latent attention (MLA), shared experts, grouped routing.

V3 is V2 with a different router (sigmoid scores, a selection bias, groups ranked by
their two best experts), ``rope_interleave`` as a flag, and other config defaults.
The first ``first_k_dense_replace`` layers are dense MLPs; the rest are sparse MoE
with ``n_shared_experts`` always-on experts fused into one MLP.
Shapes: ``T`` tokens, ``h`` heads, ``r`` kv_lora_rank, ``dn``/``dr`` the non-rotary and
rotary parts of a query/key head, ``dv`` value head dim, ``L`` cached tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..runtime.batch import ForwardBatch
from . import Family
from .args import BaseModelArgs
from .decoder import CausalLM, DecoderLayer
from .layers import RMSNorm, Rotary, attend
from .moe import MLP, Experts, GroupedSigmoidRouter, GroupLimitedSoftmaxRouter, SparseMoeBlock
from .weights_map import WeightMap

_LORA_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: transformers ignores rms_norm_eps for these


@dataclass
class ModelArgs(BaseModelArgs):
    """``deepseek_v2``; field names and defaults as in transformers' DeepseekV2Config."""

    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    max_position_embeddings: int = 2048
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1  # from DeepSeek's own config (transformers has no such key); always 1 in practice
    kv_lora_rank: int = 512
    q_lora_rank: Optional[int] = 1536
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 64
    n_shared_experts: Optional[int] = 2
    num_experts_per_tok: Optional[int] = None
    routed_scaling_factor: float = 1.0
    topk_method: Optional[str] = "greedy"
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    norm_topk_prob: Optional[bool] = False  # transformers' V2 never renormalises, whatever this says
    mlp_bias: bool = False

    TOPK_METHODS = ("greedy", "group_limited_greedy")

    def validate(self) -> None:
        # MLA has no key/value heads of its own; transformers sets head_dim to the rotary part
        self.num_key_value_heads = self.num_attention_heads
        self.head_dim = self.qk_rope_head_dim
        super().validate()
        if self.mlp_bias:
            raise ConfigError("config.json: mlp_bias=true is not supported for DeepSeek")
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_layer_freq"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"config.json: qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if not any(self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            return
        if not self.num_experts_per_tok or not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise ConfigError(
                f"config.json: num_experts_per_tok {self.num_experts_per_tok!r} must be in 1..n_routed_experts "
                f"({self.n_routed_experts})"
            )
        if self.TOPK_METHODS is not None and self.topk_method not in self.TOPK_METHODS:
            raise ConfigError(
                f"config.json: topk_method {self.topk_method!r} is not supported "
                f"(supported: {', '.join(self.TOPK_METHODS)})"
            )
        if self.grouped():
            if not self.n_group or self.n_routed_experts % self.n_group:
                raise ConfigError(
                    f"config.json: n_routed_experts {self.n_routed_experts} is not a multiple of n_group {self.n_group}"
                )
            if not self.topk_group or not 0 < self.topk_group <= self.n_group:
                raise ConfigError(f"config.json: topk_group {self.topk_group!r} must be in 1..n_group ({self.n_group})")

    def grouped(self) -> bool:
        """Whether routing is limited to the best ``topk_group`` of ``n_group`` expert groups."""
        return self.topk_method == "group_limited_greedy"

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    def rope_interleaved(self) -> bool:
        """DeepSeek-V2 always rotates adjacent pairs (transformers uses complex multiplication)."""
        return True

    def router(self) -> nn.Module:
        return GroupLimitedSoftmaxRouter(
            self.hidden_size, self.n_routed_experts, self.num_experts_per_tok,
            self.n_group if self.grouped() else 1, self.topk_group or 1,
        )


@dataclass
class V3ModelArgs(ModelArgs):
    """``deepseek_v3`` (also Kimi-K2); defaults as in transformers' DeepseekV3Config."""

    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    max_position_embeddings: int = 4096
    first_k_dense_replace: int = 3
    n_routed_experts: int = 256
    n_shared_experts: Optional[int] = 1
    num_experts_per_tok: Optional[int] = 8
    routed_scaling_factor: float = 2.5
    topk_method: Optional[str] = "noaux_tc"  # informational: V3 always routes as below
    n_group: Optional[int] = 8
    topk_group: Optional[int] = 4
    norm_topk_prob: Optional[bool] = True
    rope_interleave: bool = True

    TOPK_METHODS = None  # transformers ignores topk_method for V3 (hub configs say "noaux_tc")

    def grouped(self) -> bool:
        return (self.n_group or 1) > 1

    def rope_interleaved(self) -> bool:
        return self.rope_interleave

    def router(self) -> nn.Module:
        return GroupedSigmoidRouter(
            self.hidden_size, self.n_routed_experts, self.num_experts_per_tok,
            self.n_group or 1, self.topk_group or 1, normalize=bool(self.norm_topk_prob),
        )


def softmax_scale(args: ModelArgs) -> float:
    """``1/sqrt(dn + dr)``, times YaRN's ``mscale(factor, mscale_all_dim)**2`` when set.

    This scales the whole score ``q_nope.k_nope + q_pe.k_pe``; the rotary table separately
    carries ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` on q_pe and k_pe
    (1 in DeepSeek's own configs, where the two are equal).
    """
    scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5
    m_all = args.rope.params.get("mscale_all_dim")
    if args.rope.kind != "default" and m_all and args.rope.factor > 1:
        m = 0.1 * m_all * math.log(args.rope.factor) + 1.0
        scale *= m * m
    return scale


class MLAttention(nn.Module):
    """Multi-head latent attention, caching the compressed latent.

    Each token's keys and values are a normalised latent ``c`` ``[r]`` plus one rotary
    key ``k_pe`` ``[dr]`` shared by all heads; the cache holds exactly those, one
    ``[1, L, r + dr]`` buffer per layer, instead of ``h * (dn + dr + dv)`` values per token.
    Attention then either up-projects the cached latents to per-head keys and values
    (cheaper for long prefills) or folds ``kv_b_proj`` into the query and output
    ("absorbed", cheaper for decode): whichever costs fewer multiply-adds.
    """

    keep_unpacked = ("kv_b_proj",)  # the absorbed path reads its weight directly (models/prepack.py)

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        H, h = args.hidden_size, args.num_attention_heads
        self.h, self.r = h, args.kv_lora_rank
        self.dn, self.dr, self.dv = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        dq = self.dn + self.dr
        self.q_lora = args.q_lora_rank is not None
        if self.q_lora:
            self.q_a_proj = nn.Linear(H, args.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, _LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(args.q_lora_rank, h * dq, bias=False)
        else:
            self.q_proj = nn.Linear(H, h * dq, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.r + self.dr, bias=args.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.r, _LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.r, h * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(h * self.dv, H, bias=args.attention_bias)
        self.rotary = Rotary(self.dr, args.rope, args.max_position_embeddings, interleaved=args.rope_interleaved())
        self.scale = softmax_scale(args)
        self.absorb: bool | None = None  # None: pick per sequence by cost; True/False forces a path (tests)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q_nope, q_pe = q.view(T, self.h, self.dn + self.dr).split([self.dn, self.dr], dim=-1)
        q_pe = self.rotary(q_pe, batch.positions)  # [T, h, dr]
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.r, self.dr], dim=-1)
        k_pe = self.rotary(k_pe[:, None, :], batch.positions)  # [T, 1, dr]
        latent = torch.cat((self.kv_a_layernorm(c)[:, None, :], k_pe), dim=-1)  # [T, 1, r + dr]
        outs = []
        for i, cache in enumerate(batch.caches):
            a, b = batch.offsets[i], batch.offsets[i + 1]
            (lat,) = cache.write(self.layer, batch.starts[i], latent[a:b].transpose(0, 1))  # [1, L, r + dr]
            outs.append(self._attend(q_nope[a:b], q_pe[a:b], lat[0], batch.starts[i]))
        return self.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs, dim=0))

    def _attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor, start: int) -> torch.Tensor:
        """One sequence: q_nope ``[n, h, dn]``, q_pe ``[n, h, dr]``, lat ``[L, r + dr]`` -> ``[n, h * dv]``."""
        n, L = q_nope.shape[0], lat.shape[0]
        r, dn, dv = self.r, self.dn, self.dv
        w = self.kv_b_proj.weight.view(self.h, dn + dv, r)  # per head: k_nope rows, then v rows
        if self._use_absorbed(n, L):
            q_lat = torch.einsum("nhd,hdr->hnr", q_nope, w[:, :dn])  # [h, n, r]
            qq = torch.cat((q_lat, q_pe.transpose(0, 1)), dim=-1)  # [h, n, r + dr]
            o = attend(qq, lat[None], lat[None, :, :r], start, self.scale)  # one shared kv head: [n, h * r]
            return torch.einsum("nhr,hvr->nhv", o.view(n, self.h, r), w[:, dn:]).reshape(n, self.h * dv)
        kv = self.kv_b_proj(lat[:, :r]).view(L, self.h, dn + dv)
        k = torch.cat((kv[..., :dn], lat[:, None, r:].expand(L, self.h, self.dr)), dim=-1)  # [L, h, dn + dr]
        qq = torch.cat((q_nope, q_pe), dim=-1)  # [n, h, dn + dr]
        return attend(qq.transpose(0, 1), k.transpose(0, 1), kv[..., dn:].transpose(0, 1), start, self.scale)

    def _use_absorbed(self, n: int, L: int) -> bool:
        if self.absorb is not None:
            return self.absorb
        up = self.r * (self.dn + self.dv)  # multiply-adds per head to up-project one latent
        expanded = L * up + n * L * (self.dn + self.dr + self.dv)
        absorbed = n * up + n * L * (2 * self.r + self.dr)
        return absorbed < expanded


# transformers' DeepSeek MoE calls the shared MLP ``shared_experts``; SparseMoeBlock calls it ``shared_expert``.
# Router weights and V3's selection bias stay float32 (a bf16 bias would flip near-tied choices).
WEIGHTS = WeightMap(
    renames=(("mlp.shared_experts.", "mlp.shared_expert."),),
    keep_fp32=("mlp.gate.weight", "mlp.gate.e_score_correction_bias"),
)


def build(args: ModelArgs) -> CausalLM:
    def layer(i: int) -> DecoderLayer:
        if not args.is_moe_layer(i):
            return DecoderLayer(args, MLAttention(args, i), MLP(args.hidden_size, args.intermediate_size))
        shared = None
        if args.n_shared_experts:
            shared = MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)
        moe = SparseMoeBlock(
            args.router(),
            Experts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size),
            shared_expert=shared,
            scaling=args.routed_scaling_factor,
        )
        return DecoderLayer(args, MLAttention(args, i), moe)

    return CausalLM(args, layer)


FAMILIES = {
    "deepseek_v2": Family(ModelArgs, build, WEIGHTS),
    "deepseek_v3": Family(V3ModelArgs, build, WEIGHTS),
}
