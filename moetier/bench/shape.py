"""The sizes of a model that the sparsity-aware metrics need, read off its modules.

A model is built on the meta device from its ``config.json`` (no weights are read), and
its parameters are sorted by what a forward step does with them: matmul weights every
token passes through, the always-on shared experts, the LM head (applied only to the
rows sampled), the routed experts (only the activated ones are read), the input
embedding table (only the fed tokens' rows are read: left out), and the rest (norms,
biases; read, but not multiplied). Both systems of a benchmark are described by this
one shape, since they run the same checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..experts.setup import kv_bytes_per_token
from ..runtime.cache_spec import BOUNDED, layer_caches, state_bytes_per_seq
from ..models.moe import ExpertsBase, SparseMoeBlock


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts (elements) by role, and the per-token attention costs, of one model."""

    dense_params: int  # matmul weights every token meets: attention projections, routers, dense MLP layers
    shared_params: int  # always-on shared experts, with their gates, all layers
    head_params: int  # LM head: its FLOPs scale with the rows sampled, not the tokens fed
    other_params: int  # norms, biases, selection biases: read every step, no matmul
    expert_params: int  # one routed expert (gate, up and down projections)
    moe_layers: int
    num_experts: int  # routed experts per MoE layer
    top_k: int  # routed experts per token
    weight_bytes: int  # bytes per weight element (the run's dtype)
    kv_bytes_per_token: int  # KV cache bytes of one token, all unbounded KV layers, in the cache's own dtype
    attn_flops_per_pair: int  # all unbounded KV layers: one query position against one cached key position
    state_bytes_per_seq: int = 0  # fixed-size states (linear-attention layers) of one sequence, all layers
    # layers whose KV is bounded (runtime/cache_spec.py): (kind "window" | "chunk", limit, bytes per position)
    bounded: tuple[tuple[str, int, int], ...] = ()
    layer_pair_flops: int = 0  # one layer's attention FLOPs per query-key pair (bounded layers)
    state_flops_per_token: int = 0  # the linear-attention layers' state updates, all layers, per token fed

    @property
    def resident_bytes(self) -> int:
        """Weight bytes every step reads whatever the routing (the embedding table excepted)."""
        return (self.dense_params + self.shared_params + self.head_params + self.other_params) * self.weight_bytes

    @property
    def expert_bytes(self) -> int:
        return self.expert_params * self.weight_bytes

    @classmethod
    def of(cls, model, dtype: torch.dtype) -> "ModelShape":
        """Read the shape of a moetier ``CausalLM`` with resident ``Experts`` (on the meta device will
        do) running in ``dtype``.

        Both benchmarked systems keep their KV cache in the run's dtype, so ``dtype`` sizes it too.
        """
        args = model.args
        blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
        counts = {"dense": 0, "shared": 0, "head": 0, "other": 0}
        # only the fed tokens' rows of the embedding table are read, unless it is the (tied) head too
        seen = {id(model.model.embed_tokens.weight)} - {id(model.lm_head.weight)}
        for name, module in model.named_modules():
            if isinstance(module, ExpertsBase):
                continue
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                counts[_role(name, module, pname, model)] += p.numel()
        expert = 0
        if blocks:
            ex = blocks[0].experts
            expert = (ex.gate_up_proj.numel() + ex.down_proj.numel()) // ex.num_experts
        h = args.num_attention_heads
        caches = layer_caches(args, dtype)
        if getattr(args, "kv_lora_rank", None):  # MLA: per-head keys of dn + dr, values of dv
            d_qk, d_v = args.qk_nope_head_dim + args.qk_rope_head_dim, args.v_head_dim
        else:
            d_qk = d_v = args.head_dim
        return cls(
            dense_params=counts["dense"], shared_params=counts["shared"], head_params=counts["head"],
            other_params=counts["other"], expert_params=expert, moe_layers=len(blocks),
            num_experts=blocks[0].experts.num_experts if blocks else 0,
            top_k=blocks[0].gate.top_k if blocks else 0, weight_bytes=dtype.itemsize,
            kv_bytes_per_token=kv_bytes_per_token(args, dtype),
            # q.k over d_qk and p.v over d_v, a multiply and an add each, every head, every layer with a KV cache
            attn_flops_per_pair=2 * h * (d_qk + d_v) * sum(c.kind == "kv" for c in caches),
            state_bytes_per_seq=state_bytes_per_seq(args, dtype),
            bounded=tuple((c.kind, c.limit, c.bytes_per_token) for c in caches if c.kind in BOUNDED),
            layer_pair_flops=2 * h * (d_qk + d_v),
            state_flops_per_token=sum(c.flops_per_token for c in caches if c.kind == "state"),
        )

    @classmethod
    def of_args(cls, family, args, dtype: torch.dtype) -> "ModelShape":
        """The shape of a ``family`` model with ``args``, built on the meta device (no weights)."""
        with torch.device("meta"):
            model = family.build(args)
        model.tie_weights()  # as the loader does
        return cls.of(model, dtype)


def _role(module_name: str, module: nn.Module, param_name: str, model) -> str:
    """Which count a module's own parameter adds to (see :class:`ModelShape`)."""
    if module is model.lm_head or module is model.model.embed_tokens:  # the embedding here only when tied
        return "head"
    if ".shared_expert" in module_name:  # the shared MLP and Qwen2-MoE's shared_expert_gate
        return "shared"
    if param_name == "weight" and (isinstance(module, nn.Linear) or hasattr(module, "top_k")):
        return "dense"  # a projection, or a router's [E, H] weight
    return "other"
