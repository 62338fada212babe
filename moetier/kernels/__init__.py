"""Weights and the kernels that multiply by them: plain (``models/prepack.py``) or quantized
(:mod:`.quant` for the representation, :mod:`.linear` for its matmul). ``linear(x, w, bias)``
(``moetier.models.prepack.linear``, also reachable here) is the one entry point for both."""

from .quant import QuantScheme, QuantWeight, parse_scheme, quantize

__all__ = ["linear", "QuantScheme", "QuantWeight", "parse_scheme", "quantize"]


def __getattr__(name: str):
    if name == "linear":  # lazily: models.prepack imports this package
        from ..models.prepack import linear

        return linear
    raise AttributeError(name)
