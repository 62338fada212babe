"""The ``device`` argument checked before anything loads: a clear error instead of torch's assertion."""

from __future__ import annotations

from .errors import MoetierError


def check_device(device) -> None:
    """MoetierError when ``device`` is not a device name or names one this torch build lacks."""
    import torch

    if not isinstance(device, (str, torch.device)):
        raise MoetierError(f"device must be a string such as 'cpu' or 'cuda:0', got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise MoetierError(f"device {device!r} is not a device name (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else \
                "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)"
            raise MoetierError(f"device {device!r} was asked for, but {why}; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MoetierError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices")
    elif dev.type not in ("cpu", "meta"):
        raise MoetierError(f"device {device!r} is not supported (use cpu, cuda or cuda:N)")
