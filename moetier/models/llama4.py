"""Llama 4 (text): chunked attention on RoPE layers, NoPE layers with temperature tuning, sigmoid
routing applied to the expert input, a shared expert, MoE layers interleaved with dense MLPs.

``llama4_text`` is a ``Llama4TextConfig`` checkpoint (``Llama4ForCausalLM``); ``llama4`` a full
``Llama4ForConditionalGeneration`` one, whose ``text_config`` and ``language_model.`` weights are
read (the vision tower and projector are ignored).

* Layer ``i`` uses RoPE iff ``no_rope_layers[i]`` (by default all but every ``no_rope_layer_interval``-th),
  rotating adjacent pairs; RoPE layers L2-normalise q and k per head (``use_qk_norm``) and, when
  ``attention_chunk_size`` is set, attend within their chunk only (``layer_types``); NoPE layers
  attend to everything and, with ``attn_temperature_tuning``, scale queries by position.
* Layer ``i`` is MoE iff in ``moe_layers`` (by default every ``interleave_moe_layer_step``-th), else a
  SwiGLU MLP of ``intermediate_size_mlp``. The router keeps the top k logits and weighs each chosen
  expert's *input* by the logit's sigmoid; the shared expert (``intermediate_size``) always runs.
  Experts are stored ``[E, H, 2I]`` / ``[E, I, H]`` (weights/views.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from . import Family
from .args import BaseModelArgs, RopeArgs
from .attn_ext import ExtAttention
from .decoder import CausalLM, DecoderLayer
from .moe import MLP, Experts, SigmoidTopKRouter, SparseMoeBlock
from .weights_map import WeightMap

LAYER_KINDS = ("full_attention", "chunked_attention")


@dataclass
class ModelArgs(BaseModelArgs):
    """``llama4_text``; field names and defaults as in transformers' Llama4TextConfig."""

    num_key_value_heads: Optional[int] = 8
    head_dim: Optional[int] = 128
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096 * 32
    intermediate_size: int = 8192
    intermediate_size_mlp: int = 16384
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    moe_layers: Optional[list] = None
    interleave_moe_layer_step: int = 1
    use_qk_norm: bool = True
    no_rope_layers: Optional[list] = None
    no_rope_layer_interval: int = 4
    attention_chunk_size: Optional[int] = 8192
    layer_types: Optional[list] = None
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192
    attn_scale: float = 0.1

    DEFAULT_ROPE_THETA = 500000.0
    ROPE_KINDS = RopeArgs.KINDS + ("llama3",)  # Scout's rope_scaling

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelArgs":
        text = raw.get("text_config")
        if isinstance(text, dict):  # a full Llama4ForConditionalGeneration config: its language model's
            raw = {"model_type": "llama4_text", **text}
        return super().from_dict(raw)

    def validate(self) -> None:
        super().validate()
        n = self.num_hidden_layers
        if not self.no_rope_layers:
            if self.no_rope_layer_interval <= 0:
                raise ConfigError(f"config.json: no_rope_layer_interval must be positive, got "
                                  f"{self.no_rope_layer_interval}")
            self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0) for i in range(n)]
        if self.moe_layers is None:
            if self.interleave_moe_layer_step <= 0:
                raise ConfigError(f"config.json: interleave_moe_layer_step must be positive, got "
                                  f"{self.interleave_moe_layer_step}")
            self.moe_layers = list(range(self.interleave_moe_layer_step - 1, n, self.interleave_moe_layer_step))
        if self.layer_types is None:
            self.layer_types = ["chunked_attention" if r and self.attention_chunk_size is not None else "full_attention"
                                for r in self.no_rope_layers]
        for name, kinds in (("no_rope_layers", None), ("layer_types", LAYER_KINDS)):
            v = getattr(self, name)
            if not isinstance(v, list) or len(v) < n or (kinds is not None and not set(v[:n]) <= set(kinds)):
                raise ConfigError(f"config.json: {name} should have an entry for each of {n} layers, got {v!r}")
        if not isinstance(self.moe_layers, list) or not all(isinstance(i, int) for i in self.moe_layers):
            raise ConfigError(f"config.json: moe_layers should be a list of layer indices, got {self.moe_layers!r}")
        if "chunked_attention" in self.layer_types[:n] and not (self.attention_chunk_size or 0) > 0:
            raise ConfigError(f"config.json: attention_chunk_size must be positive, got {self.attention_chunk_size!r}")
        if self.moe_layers and not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(f"config.json: num_experts_per_tok {self.num_experts_per_tok} must be in "
                              f"1..num_local_experts ({self.num_local_experts})")
        if self.attn_temperature_tuning and self.floor_scale <= 0:
            raise ConfigError(f"config.json: floor_scale must be positive, got {self.floor_scale}")

    def chunk(self, i: int) -> Optional[int]:
        return self.attention_chunk_size if self.layer_types[i] == "chunked_attention" else None

    def layer_caches(self, dtype):
        """Chunked layers hold at most one chunk of positions (a ring, ``runtime/cache_spec.py``), full
        layers keys and values of every position."""
        from ..runtime.cache_spec import chunk, kv

        per = 2 * self.num_key_value_heads * self.head_dim * dtype.itemsize
        return [kv(per) if self.chunk(i) is None else chunk(per, self.chunk(i)) for i in range(self.num_hidden_layers)]

    def attention(self, i: int) -> ExtAttention:
        rope = bool(self.no_rope_layers[i])
        return ExtAttention(
            self, i, qkv_bias=self.attention_bias, rope=rope, interleaved_rope=True,
            chunk=self.chunk(i),
            l2_qk_norm=self.use_qk_norm and rope,
            temperature=(self.floor_scale, self.attn_scale) if self.attn_temperature_tuning and not rope else None,
        )


# the full checkpoint's language model drops its prefix; transformers' feed_forward/router are mlp/gate here
WEIGHTS = WeightMap(renames=(("language_model.", ""), (".feed_forward.", ".mlp."), (".mlp.router.", ".mlp.gate.")),
                    experts_transposed=True)


def build(args: ModelArgs) -> CausalLM:
    H, E, inter = args.hidden_size, args.num_local_experts, args.intermediate_size
    moe_layers = set(args.moe_layers)

    def layer(i: int) -> DecoderLayer:
        if i not in moe_layers:
            return DecoderLayer(args, args.attention(i), MLP(H, args.intermediate_size_mlp))
        moe = SparseMoeBlock(
            SigmoidTopKRouter(H, E, args.num_experts_per_tok),
            Experts(E, H, inter, scale_input=True),
            shared_expert=MLP(H, inter),
        )
        return DecoderLayer(args, args.attention(i), moe)

    return CausalLM(args, layer)


FAMILIES = {"llama4_text": Family(ModelArgs, build, WEIGHTS), "llama4": Family(ModelArgs, build, WEIGHTS)}
