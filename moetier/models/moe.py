"""Router, Experts and the sparse MoE block (three parts, as in transformers).

``Experts`` is the one module that touches expert weights: offloading swaps in
a different ``Experts``; the router and block never change.
Shapes: ``T`` tokens, ``H`` hidden, ``I`` expert intermediate, ``E`` experts, ``k`` top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import native
from ..kernels.linear import has_native, native_kind, native_rows
from .prepack import linear


def fused_ok(x: torch.Tensor, pairs: list, rows: int = 1) -> bool:
    """Whether the experts ``pairs`` can run as one native call on ``x`` when each gets at most ``rows`` of its rows
    (``kernels/native``: the same kernels, roundings and sums as the per-expert path takes for so few rows, in one
    call instead of several ops per expert)."""
    if not (x.is_cpu and x.dtype in (torch.bfloat16, torch.float32) and x.is_contiguous()):
        return False
    threads = torch.get_num_threads()
    for pair in pairs:
        for w in pair:
            kind = native_kind(w)
            if not has_native(w) or native_rows(kind, threads) <= rows or (kind == "bf16" and x.dtype != torch.bfloat16):
                return False
    return True


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers and shared experts."""

    def __init__(self, hidden: int, inter: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SoftmaxTopKRouter(nn.Module):
    """Softmax over all experts, keep the top k, optionally renormalise them.

    Mixtral always renormalises; Qwen-MoE and OLMoE follow ``norm_topk_prob``.
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, normalize: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.top_k = top_k
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[T, H]`` -> (weights ``[T, k]`` float32, expert ids ``[T, k]``)."""
        probs = F.softmax(F.linear(x, self.weight).float(), dim=-1)  # [T, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids


class Float32SoftmaxRouter(SoftmaxTopKRouter):
    """:class:`SoftmaxTopKRouter` with its logits and softmax in float32 whatever the model dtype
    (the router weight is kept in float32: Hunyuan's ``wg``)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(F.linear(x.float(), self.weight.float()), dim=-1)  # [T, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids


class BiasedSoftmaxRouter(nn.Module):
    """ERNIE 4.5: float32 softmax; ``e_score_correction_bias`` (``[1, E]``, as stored) steers the
    choice only; the chosen unbiased probabilities are renormalised (sum clamped below at ``norm_min``)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_min: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(1, num_experts), requires_grad=False)
        self.top_k = top_k
        self.norm_min = norm_min

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(F.linear(x.float(), self.weight.float()), dim=-1)  # [T, E]
        ids = torch.topk(probs + self.e_score_correction_bias.float()[0], self.top_k, dim=-1).indices
        weights = probs.gather(1, ids)
        return weights / weights.sum(dim=-1, keepdim=True).clamp(min=self.norm_min), ids


class SparseMixerRouter(nn.Module):
    """Phi-3.5-MoE's sparsemixer at inference: two experts, picked one after the other.

    The first is the best logit; its weight is its softmax among the logits within a relative
    ``2 * jitter_eps`` of it (the rest masked out). The second is the best of the others, weighted
    the same way among the others. Logits in the model dtype, as transformers computes them.
    """

    top_k = 2

    def __init__(self, hidden: int, num_experts: int, jitter_eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.jitter_eps = jitter_eps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x, self.weight).float()  # [T, E]
        first_w, first = self._pick(scores, scores)
        rest = scores.scatter(-1, first, float("-inf"))
        second_w, second = self._pick(scores, rest)
        return torch.cat((first_w, second_w), dim=-1), torch.cat((first, second), dim=-1)

    def _pick(self, scores: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        best, ids = candidates.max(dim=-1, keepdim=True)  # [T, 1]
        far = (best - scores) / scores.abs().clamp(min=best) > 2 * self.jitter_eps
        return F.softmax(candidates.masked_fill(far, float("-inf")), dim=-1).gather(-1, ids), ids


def _group_mask(group_scores: torch.Tensor, topk_group: int, num_experts: int) -> torch.Tensor:
    """Keep the ``topk_group`` best groups: group scores ``[T, G]`` -> expert mask ``[T, E]`` (bool)."""
    keep = torch.topk(group_scores, topk_group, dim=-1).indices  # [T, topk_group]
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)  # [T, G]
    return mask.repeat_interleave(num_experts // group_scores.shape[1], dim=1)


class GroupLimitedSoftmaxRouter(nn.Module):
    """DeepSeek-V2: softmax over all experts, then the top k of them ("greedy"), or the top
    k within the ``topk_group`` groups whose best expert scores highest ("group_limited_greedy").

    Never renormalised: transformers' DeepSeek-V2 ignores ``norm_topk_prob``. Scores are
    computed in float32 whatever the model dtype, as transformers does.
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, n_group: int = 1, topk_group: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.top_k = top_k
        self.n_group = n_group
        self.topk_group = topk_group

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[T, H]`` -> (weights ``[T, k]`` float32, expert ids ``[T, k]``)."""
        scores = F.softmax(F.linear(x.float(), self.weight.float()), dim=-1)  # [T, E]
        if self.n_group > 1 and self.topk_group < self.n_group:
            T, E = scores.shape
            group_best = scores.view(T, self.n_group, E // self.n_group).amax(dim=-1)  # [T, G]
            scores = scores.masked_fill(~_group_mask(group_best, self.topk_group, E), 0.0)
        weights, ids = torch.topk(scores, self.top_k, dim=-1)
        return weights, ids


class GroupedSigmoidRouter(nn.Module):
    """DeepSeek-V3: sigmoid scores; ``e_score_correction_bias`` steers the choice only.

    Groups are ranked by the sum of their two best biased scores, the top k experts
    are taken from the best ``topk_group`` groups, and their unbiased scores are the
    weights (renormalised if ``normalize``).
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, n_group: int, topk_group: int, normalize: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        # a checkpoint tensor, not trained here: a parameter so that the loader fills it
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False)
        self.top_k = top_k
        self.n_group = n_group
        self.topk_group = topk_group
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[T, H]`` -> (weights ``[T, k]`` float32, expert ids ``[T, k]``)."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # [T, E]
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1 and self.topk_group < self.n_group:
            T, E = choice.shape
            per_group = choice.view(T, self.n_group, E // self.n_group)
            group_score = per_group.topk(min(2, E // self.n_group), dim=-1).values.sum(dim=-1)  # [T, G]
            choice = choice.masked_fill(~_group_mask(group_score, self.topk_group, E), float("-inf"))
        ids = torch.topk(choice, self.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, ids)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights, ids


def clamped_swiglu(alpha: float, limit: float):
    """gpt-oss's activation: ``(clamp(up, ±limit) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate, limit)``."""

    def act(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    return act


class TopKSoftmaxRouter(nn.Module):
    """gpt-oss: the top k of the (biased) router logits, then a softmax over those k only."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.bias = nn.Parameter(torch.empty(num_experts)) if bias else None
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[T, H]`` -> (weights ``[T, k]`` float32, expert ids ``[T, k]``)."""
        top, ids = torch.topk(F.linear(x, self.weight, self.bias), self.top_k, dim=-1)
        return F.softmax(top.float(), dim=-1), ids


class SigmoidTopKRouter(nn.Module):
    """Llama 4: the top k router logits, each weighed by its sigmoid (rounded to the input's dtype)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, ids = torch.topk(F.linear(x, self.weight), self.top_k, dim=-1)
        return torch.sigmoid(top.float()).to(x.dtype).float(), ids


class ExpertsBase(nn.Module):
    """The math of a layer's routed experts; subclasses say where expert ``e``'s weights are.

    Expert ``e`` is ``gate_up`` ``[2I, H]`` (gate rows, then up rows) and
    ``down`` ``[H, I]``. Resident and offloaded experts run this same code on
    tensors of the same shape and layout, so their outputs are bit-identical.

    Variants (all off by default, see :meth:`extras`): ``act`` replaces ``silu(gate) * up``
    (gpt-oss: :func:`clamped_swiglu`); ``gate_up_proj_bias`` ``[E, 2I]`` / ``down_proj_bias``
    ``[E, H]`` are added after each projection (gpt-oss); ``scale_input`` multiplies each
    token's input by its routing weight instead of the expert's output (Llama 4).
    """

    num_experts: int
    act = None  # None: silu(gate) * up; else a function (gate, up) -> hidden
    scale_input = False

    def plain(self) -> bool:
        """Whether the math is the default SwiGLU with output weighting (what the native kernels compute)."""
        return self.act is None and not self.scale_input and "gate_up_proj_bias" not in self._parameters

    def adopt(self, other: "ExpertsBase") -> "ExpertsBase":
        """Take ``other``'s variant settings and biases (offloading swaps the module, not the math)."""
        self.act, self.scale_input = other.act, other.scale_input
        for name in ("gate_up_proj_bias", "down_proj_bias"):
            b = getattr(other, name, None)
            if b is not None:
                setattr(self, name, b if isinstance(b, nn.Parameter) else nn.Parameter(b, requires_grad=False))
        return self

    def weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Run expert ``e`` on ``x`` ``[n, H]``."""
        gate_up, down = self.weights(e)
        if self.plain():
            gate, up = linear(x, gate_up).chunk(2, dim=-1)  # [n, I] each
            return linear(F.silu(gate) * up, down)
        h = linear(x, gate_up)
        gu_bias, down_bias = self._parameters.get("gate_up_proj_bias"), self._parameters.get("down_proj_bias")
        if gu_bias is not None:
            h = h + gu_bias[e]
        gate, up = h.chunk(2, dim=-1)
        y = linear(F.silu(gate) * up if self.act is None else self.act(gate, up), down)
        return y if down_bias is None else y + down_bias[e]

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x ``[T, H]``, ids/weights ``[T, k]`` -> weighted sum of the chosen experts ``[T, H]``."""
        T, k = ids.shape
        if self.scale_input:  # Llama 4: expert(w * x), summed unweighted
            return self._forward_scaled(x, ids, weights)
        if T == 1:  # decode at batch 1: no gather, no scatter
            out = None
            chosen, ws = ids.tolist()[0], weights.tolist()[0]
            # python floats: the same float32 products as weights[0, j], without a select per expert
            pairs = [self.weights(e) for e in chosen]
            if self.plain() and fused_ok(x, pairs):
                return native.moe1(x, pairs, ws)
            for e, w in zip(chosen, ws):
                y = self.expert(e, x).float() * w
                out = y if out is None else out + y
            return out.to(x.dtype)
        if self.plain() and weights.dtype == torch.float32:  # decode of a batch: one native call
            rows = torch.bincount(ids.reshape(-1), minlength=self.num_experts).tolist()
            used = [e for e, n in enumerate(rows) if n]
            pairs = [self.weights(e) for e in used]
            if fused_ok(x, pairs, max(rows)):
                slot = {e: i for i, e in enumerate(used)}
                return native.moe(x, pairs, [slot[e] for e in ids.reshape(-1).tolist()], weights)
        # weigh and sum each token's k outputs in float32 (no scatter-add, no order dependence)
        return (self._slots(x, ids) * weights[..., None]).sum(dim=1).to(x.dtype)

    def _slots(self, x: torch.Tensor, ids: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Every token-slot's expert output ``[T, k, H]``, the experts run on their rows grouped;
        ``scale`` ``[T, k]`` multiplies each slot's input first."""
        T, k = ids.shape
        flat = ids.reshape(-1)  # [T*k] token-slots, token-major
        order = torch.argsort(flat, stable=True)  # token-slots grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        xs = x[order // k]  # [T*k, H] inputs in expert order
        if scale is not None:
            xs = xs * scale.reshape(-1)[order, None]
        ys = torch.empty_like(xs)
        pos = 0
        for e, n in enumerate(counts):
            if n:
                ys[pos : pos + n] = self.expert(e, xs[pos : pos + n])
                pos += n
        slots = torch.empty_like(ys)
        slots[order] = ys  # back to token-major: [T*k, H]
        return slots.view(T, k, -1)

    def _forward_scaled(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each chosen expert runs on its token's input times the routing weight (rounded to the
        input's dtype first, as transformers' Llama 4 does); the k outputs are summed in float32."""
        T, k = ids.shape
        w = weights.to(x.dtype)
        if T == 1:
            out = None
            for j, e in enumerate(ids.tolist()[0]):
                y = self.expert(e, x * w[:, j : j + 1]).float()
                out = y if out is None else out + y
            return out.to(x.dtype)
        return self._slots(x, ids, w).float().sum(dim=1).to(x.dtype)


class Experts(ExpertsBase):
    """All routed experts of one layer, resident, stacked expert-major:
    ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``."""

    def __init__(self, num_experts: int, hidden: int, inter: int, bias: bool = False, act=None,
                 scale_input: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.inter = inter
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))
        if bias:  # gpt-oss: gate_up bias in the same (gate, then up) order as the rows
            self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * inter))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden))
        self.act = act
        self.scale_input = scale_input
        self.packed: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # see prepack() and quantize()
        self.quant_layout = None  # kernels.region.QuantExpertLayout of quantized experts

    def weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.packed is not None:
            return self.packed[e]
        return self.gate_up_proj[e], self.down_proj[e]

    def quantize(self, scheme) -> int:
        """Quantize every expert by ``scheme`` (``kernels.quant.QuantScheme``, scales in the weights'
        dtype) into one region per expert laid out as in the packed file and the store's slots
        (``kernels/region.py``), so resident and offloaded quantized experts are bit-identical.
        The stacked parameters keep only their shapes. Returns matrices quantized."""
        from ..kernels.quant import quantize
        from ..kernels.region import QuantExpertLayout

        E, dtype = self.num_experts, self.gate_up_proj.dtype
        layout = QuantExpertLayout.of(scheme, tuple(self.gate_up_proj.shape[1:]), tuple(self.down_proj.shape[1:]),
                                      dtype)
        regions = self.empty_regions(layout)
        for e in range(E):
            layout.write(regions[e], quantize(self.gate_up_proj[e].data, scheme, what="the experts' gate_up"),
                         quantize(self.down_proj[e].data, scheme, what="the experts' down"))
        self.install_regions(layout, regions)
        return 2 * E

    def empty_regions(self, layout) -> torch.Tensor:
        """``[E, slot_bytes]`` uint8 on the experts' device, page-aligned on the CPU (as the expert store's
        slots), for quantized regions."""
        from ..weights.direct_io import aligned_buffer

        device = self.gate_up_proj.device
        if device.type != "cpu":
            return torch.empty(self.num_experts, layout.slot_bytes, dtype=torch.uint8, device=device)
        return aligned_buffer(self.num_experts * layout.slot_bytes).view(self.num_experts, layout.slot_bytes)

    def install_regions(self, layout, regions: torch.Tensor) -> None:
        """Serve the experts from quantized ``regions`` (:meth:`empty_regions`, filled)."""
        from .prepack import keep_shape_only

        self.register_buffer("regions", regions, persistent=False)
        self.quant_layout = layout
        self.packed = [layout.views(regions[e]) for e in range(self.num_experts)]
        keep_shape_only(self, "gate_up_proj")
        keep_shape_only(self, "down_proj")

    def prepack(self) -> int:
        """Move every expert's weights into oneDNN's layout (``models/prepack.py``: same results,
        faster on the CPU); the stacked parameters keep only their shapes. Returns matrices packed."""
        from .prepack import keep_shape_only, pack_weight

        if self.packed is not None:  # already packed or quantized
            return 0
        self.packed = [(pack_weight(gu), pack_weight(dn)) for gu, dn in zip(self.gate_up_proj, self.down_proj)]
        keep_shape_only(self, "gate_up_proj")
        keep_shape_only(self, "down_proj")
        return 2 * len(self.packed)


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ an always-on shared expert, optionally gated)."""

    def __init__(
        self,
        gate: nn.Module,
        experts: Experts,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: bool = False,
        scaling: float = 1.0,
    ):
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.shared_expert = shared_expert
        hidden = experts.gate_up_proj.shape[-1]
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if shared_expert_gate else None
        self.scaling = scaling  # routed_scaling_factor, folded into the routing weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        if self.scaling != 1.0:
            weights = weights * self.scaling
        out = self.experts(x, ids, weights)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out
