"""How a family's checkpoint tensor names map onto moetier's parameters."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ExpertPiece:
    """One per-expert 2D tensor destined for a slice of a stacked parameter."""

    target: str  # e.g. model.layers.3.mlp.experts.gate_up_proj
    expert: int
    part: str  # "gate" | "up" | "down"


@dataclass(frozen=True)
class WeightMap:
    """Name translation for one family.

    ``renames``: substring replacements applied to every checkpoint name, in order.
    ``expert_names``: the per-expert tensor names for (gate, up, down) in hub
    checkpoints (``...experts.{e}.{name}.weight``); they are stacked into
    ``experts.gate_up_proj`` ``[E, 2I, H]`` and ``experts.down_proj`` ``[E, H, I]``.
    Fused checkpoints already store those two 3D tensors and need no mapping.
    ``keep_fp32``: parameter-name suffixes loaded in float32 whatever the model dtype
    (router weights and biases, as transformers' ``_keep_in_fp32_modules_strict``).
    """

    renames: tuple[tuple[str, str], ...] = ()
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    keep_fp32: tuple[str, ...] = ()
    # 3D experts stored [E, in, out] (gpt-oss, Llama 4); gate/up interleaved (gpt-oss): weights/views.py
    experts_transposed: bool = False
    gate_up_interleaved: bool = False

    def open(self, reader):
        """``reader`` as this family's tensors are read: wrapped in a weights.views.ExpertsView if their
        experts are stored in another layout (or as MXFP4), else as is."""
        if not (self.experts_transposed or self.gate_up_interleaved):
            return reader
        from ..weights.views import ExpertsView

        return ExpertsView(reader, transposed=self.experts_transposed, interleaved=self.gate_up_interleaved)

    def keeps_fp32(self, name: str) -> bool:
        return name.endswith(self.keep_fp32)

    def translate(self, name: str) -> str | ExpertPiece:
        for old, new in self.renames:
            name = name.replace(old, new)
        m = self._expert_re.match(name)
        if m is None:
            return name
        part = ("gate", "up", "down")[self.expert_names.index(m.group(3))]
        target = f"{m.group(1)}.experts." + ("down_proj" if part == "down" else "gate_up_proj")
        return ExpertPiece(target, int(m.group(2)), part)

    @property
    def _expert_re(self) -> re.Pattern:
        alts = "|".join(re.escape(n) for n in self.expert_names)
        return re.compile(rf"^(.*)\.experts\.(\d+)\.({alts})\.weight$")


def layer_index(name: str) -> Optional[int]:
    """The decoder layer a tensor belongs to, or None for embeddings/head/norm."""
    m = re.search(r"\blayers\.(\d+)\.", name)
    return int(m.group(1)) if m else None
