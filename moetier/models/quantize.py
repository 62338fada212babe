"""Quantize a loaded model in place: routed experts by one scheme, attention / LM head / dense MLPs by another.

What stays in 16 bits (or the checkpoint's dtype): routers, norms, embeddings, Qwen's one-output
``shared_expert_gate``, weights a module reads directly (its ``keep_unpacked``, e.g. DeepSeek's
``kv_b_proj``) and a head tied to the embeddings. Every other ``nn.Linear`` (attention projections,
the LM head, dense and shared-expert MLPs) follows the dense scheme.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from ..kernels.quant import QuantScheme, QuantWeight, quantize
from .prepack import linear

log = logging.getLogger(__name__)


class QuantLinear(nn.Linear):
    """A linear layer on a :class:`QuantWeight` (its ``codes`` and ``scales`` are buffers); ``weight``
    keeps only the shape and dtype (meta), for code that sizes layers by it (the planner)."""

    def __init__(self, qweight: QuantWeight, bias: Optional[torch.Tensor]):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate the full weight
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.weight = nn.Parameter(torch.empty(qweight.shape, dtype=qweight.dtype, device="meta"), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("codes", qweight.codes)
        self.register_buffer("scales", qweight.scales)
        self.qweight = qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return repr(self.qweight)


def _dense_linears(model: nn.Module):
    """``(name, parent, attribute, module)`` of each ``nn.Linear`` the dense scheme covers."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    for prefix, parent in list(model.named_modules()):
        keep = set(getattr(parent, "keep_unpacked", ())) | {"shared_expert_gate"}
        for name, m in list(parent.named_children()):
            if type(m) is nn.Linear and name not in keep and counts.get(id(m.weight), 0) == 1:
                yield (f"{prefix}.{name}" if prefix else name), parent, name, m


def dense_targets(model: nn.Module) -> list[str]:
    """Parameter names (``....weight``) of the linears the dense scheme quantizes."""
    return [f"{full}.weight" for full, *_ in _dense_linears(model)]


def quantize_dense(model: nn.Module, scheme: Optional[QuantScheme],
                   install: Optional[dict[str, QuantWeight]] = None) -> int:
    """Replace the model's dense ``nn.Linear`` layers (see the module docstring) by QuantLinear.

    ``install``: ready QuantWeights by parameter name (a packed folder's); else each weight is
    quantized by ``scheme`` from its values, scales in its dtype. Returns how many were replaced.
    """
    n = 0
    for full, parent, name, m in list(_dense_linears(model)):
        if install is not None:
            qw = install.get(f"{full}.weight")
            if qw is None:
                continue
        elif m.weight.device.type == "meta":
            continue
        else:
            qw = quantize(m.weight.data, scheme, what=f"{full}.weight")
        setattr(parent, name, QuantLinear(qw, None if m.bias is None else m.bias.data))
        n += 1
    return n


def quantize_model(model: nn.Module, experts: Optional[QuantScheme], dense: Optional[QuantScheme]) -> int:
    """Quantize ``model``'s resident routed experts by ``experts`` and its dense linears by ``dense``
    (either None: left as they are). Returns how many weight matrices were quantized."""
    from .moe import Experts

    n = 0
    if experts is not None:
        for m in model.modules():
            if isinstance(m, Experts) and m.gate_up_proj.device.type != "meta":
                n += m.quantize(experts)
    if dense is not None:
        n += quantize_dense(model, dense)
    return n


def quantize_on_load(model: nn.Module, folder, experts: Optional[QuantScheme], dense: Optional[QuantScheme]) -> None:
    """``LLM(folder, quantization=...)``: quantize a loaded model, unless ``folder`` is a packed folder
    that already holds quantized weights (then the schemes must be the ones it was converted with).

    An ``exact`` experts scheme (MXFP4 experts kept as they are stored, ``weights/views.py``) that cannot
    hold them (values not finite in the run's dtype: an exponent out of its range) leaves them
    dequantized, with a warning."""
    if experts is not None and experts.exact:
        from ..kernels.quant import QuantError
        from .moe import Experts

        layers = [m for m in model.modules() if isinstance(m, Experts) and m.gate_up_proj.device.type != "meta"]
        bad = next((m for m in layers for w in (m.gate_up_proj, m.down_proj) if not bool(torch.isfinite(w).all())),
                   None)
        if bad is None:
            try:
                for m in layers:
                    m.quantize(experts)
            except QuantError as e:  # not for finite MXFP4 values; layers done before it hold the same values
                bad = e
        if bad is not None:
            log.warning("%s: MXFP4 experts kept dequantized to %s (%s)", folder,
                        str(layers[0].gate_up_proj.dtype).removeprefix("torch."),
                        bad if isinstance(bad, QuantError) else "values out of range of that dtype")
        experts = None
    if experts is None and dense is None:
        return
    from ..errors import MoetierError
    from ..weights.packed import PackedCheckpoint, is_packed
    from ..weights.packed_quant import index_quant

    if is_packed(folder):
        with PackedCheckpoint(folder) as ckpt:
            stored = ckpt.quant
        if stored is not None:
            if stored != index_quant(experts, dense):
                raise MoetierError(f"{folder}: converted with quantization {stored}, not {index_quant(experts, dense)}; "
                                   f"load it without one, or convert the original checkpoint again")
            return
    quantize_model(model, experts, dense)


def describe(model: nn.Module) -> Optional[dict]:
    """The model's quantization as ``LLM.quantization`` reports it: ``{"name", "experts", "dense"}``
    (``experts`` / ``dense``: ``{"kind", "group_size"}`` or None; group_size None = per-channel), or
    None when no weight is quantized."""
    def of(kind: str, group: int, inputs: int) -> dict:
        return {"kind": kind, "group_size": None if group == inputs else group}

    experts = dense = None
    for m in model.modules():
        layout = getattr(m, "quant_layout", None)  # resident Experts
        if layout is None and hasattr(m, "runtime"):  # OffloadedExperts: what the store's slots hold
            layout = m.runtime.store.layout if hasattr(m.runtime.store.layout, "gate_up_spec") else None
        if layout is not None and experts is None:
            spec = layout.gate_up_spec
            experts = of(spec.kind, spec.group_size, spec.shape[1])
        if isinstance(m, QuantLinear) and dense is None:
            dense = of(m.qweight.kind, m.qweight.group_size, m.qweight.shape[1])
    if experts is None and dense is None:
        return None

    def label(d):
        return d["kind"] + (f"-g{d['group_size']}" if d["group_size"] else "")

    name = label(experts) if experts else "none"
    if dense is not None:
        name += f"+{label(dense)}-dense"
    return {"name": name, "experts": experts, "dense": dense}
