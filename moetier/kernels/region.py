"""One quantized expert as one byte region: the layout shared by the packed file, the expert store's
slots and resident quantized experts, so all three hand the kernels the same bytes the same way.

Region of an expert (every start a multiple of ``ALIGN``, 4 KiB)::

    0                  gate_up codes   ([2I, H] weight: gate rows, then up rows)
    gate_up scales     (QuantSpec.scales_offset after the codes)
    down_offset        down codes      ([H, I] weight)
    down scales

Resident experts live in page-aligned buffers of ``slot_bytes`` per expert, as slots do, so a
weight's codes and scales sit at the same offsets, strides and alignment on every path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import QuantScheme, QuantSpec, QuantWeight

ALIGN = 4096


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class QuantExpertLayout:
    """The store's view of a quantized expert region (same interface as ``experts.store.ExpertLayout``)."""

    gate_up_spec: QuantSpec
    down_spec: QuantSpec

    @classmethod
    def of(cls, scheme: QuantScheme, gate_up: tuple[int, int], down: tuple[int, int],
           dtype: torch.dtype) -> "QuantExpertLayout":
        return cls(scheme.spec(gate_up, dtype, "the experts' gate_up"), scheme.spec(down, dtype, "the experts' down"))

    @property
    def gate_up(self) -> tuple[int, int]:
        return self.gate_up_spec.shape

    @property
    def down(self) -> tuple[int, int]:
        return self.down_spec.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.gate_up_spec.dtype

    @property
    def kind(self) -> str:
        return self.gate_up_spec.kind

    @property
    def down_offset(self) -> int:
        return _round_up(self.gate_up_spec.nbytes(ALIGN))

    @property
    def nbytes(self) -> int:
        return self.down_offset + self.down_spec.nbytes(ALIGN)

    @property
    def slot_bytes(self) -> int:
        return _round_up(self.nbytes)

    def views(self, buf: torch.Tensor) -> tuple[QuantWeight, QuantWeight]:
        """``(gate_up, down)`` QuantWeights viewing a uint8 region ``buf``."""
        return (self.gate_up_spec.view(buf, ALIGN),
                self.down_spec.view(buf[self.down_offset :], ALIGN))

    def write(self, buf: torch.Tensor, gate_up: QuantWeight, down: QuantWeight) -> None:
        """Fill uint8 ``buf`` (at least ``nbytes``) with the region; padding is zeroed."""
        buf[: self.nbytes].zero_()
        self.gate_up_spec.write(gate_up, buf, ALIGN)
        self.down_spec.write(down, buf[self.down_offset :], ALIGN)
