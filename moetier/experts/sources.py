"""Where experts rest between uses: host memory (``TensorSource``) or the packed checkpoint on disk."""

from __future__ import annotations

import threading

import torch

from .store import ALIGN, ExpertLayout


def layout_for(inter: int, hidden: int, dtype: torch.dtype) -> ExpertLayout:
    """The region layout moetier uses: gate_up rows, then down rows, each start 4 KiB-aligned."""
    gu_bytes = 2 * inter * hidden * dtype.itemsize
    return ExpertLayout(gate_up=(2 * inter, hidden), down=(hidden, inter), dtype=dtype,
                        down_offset=-(-gu_bytes // ALIGN) * ALIGN)


class TensorSource:
    """Experts held in host memory as stacked ``[E, 2I, H]`` / ``[E, H, I]`` tensors per MoE layer."""

    def __init__(self, gate_up: list[torch.Tensor], down: list[torch.Tensor]):
        self.gate_up, self.down = gate_up, down
        E, two_i, H = gate_up[0].shape
        self.layout = layout_for(two_i // 2, H, gate_up[0].dtype)

    def read_into(self, layer: int, expert: int, out: torch.Tensor) -> None:
        gu, dn = self.layout.views(out)
        gu.copy_(self.gate_up[layer][expert])
        dn.copy_(self.down[layer][expert])


class PackedSource:
    """Experts read from a packed checkpoint on disk, one aligned read each (O_DIRECT where allowed).

    ``layers[i]`` is the decoder layer of MoE layer ``i`` (the store counts MoE layers only).
    ``verify`` (see :mod:`moetier.weights.checksum`): ``"first-read"`` checks each expert's CRC-32
    on its first read and remembers it, ``"full"`` on every read, ``"off"`` never. The check runs
    in the caller, a loader thread of the store, so it overlaps the other loads and the math; a
    mismatch is a CheckpointError naming the file, the layer and the expert.
    """

    def __init__(self, packed, layers: list[int], verify: str = "first-read"):
        from ..weights.checksum import parse_verify

        self.packed = packed
        self.layers = layers
        self.verify = parse_verify(verify)
        self.verified: set[tuple[int, int]] = set()  # (decoder layer, expert) whose bytes were checked
        self._lock = threading.Lock()
        r = packed.expert_region(layers[0], 0)
        gu, dn = r.parts
        if gu.quant is not None:  # codes and scales: the store moves the bytes, the views are QuantWeights
            from ..kernels.region import QuantExpertLayout

            self.layout = QuantExpertLayout(gu.quant, dn.quant)
        else:
            self.layout = ExpertLayout(gate_up=tuple(gu.shape), down=tuple(dn.shape), dtype=r.dtype,
                                       down_offset=dn.offset)

    def read_into(self, layer: int, expert: int, out: torch.Tensor) -> None:
        key = (self.layers[layer], expert)
        check = self.verify == "full" or (self.verify == "first-read" and key not in self.verified)
        self.packed.read_into(*key, out, verify=check)
        if check:
            with self._lock:
                self.verified.add(key)
