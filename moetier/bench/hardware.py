"""The hardware a benchmark's utilization and cost are measured against.

Peak memory bandwidth and peak dense BF16 tensor FLOP/s (without structured sparsity)
are NVIDIA datasheet values (H100/H200/A100 product datasheets, the RTX A5000
datasheet, the Ada Lovelace architecture whitepaper for the RTX 4090: BF16 with FP32
accumulate), as is the power (TDP / total board power). Prices are ballpark
on-demand GPU-cloud rates per GPU-hour (2025), not datasheet values: they move, so
``--price-per-hour`` overrides them.

``local`` is this machine, measured on the spot in the run's dtype: the bandwidth of a
large memory copy (read + write) and the rate of a large matmul
(:class:`~moetier.runtime.machine.MachineProfile`; for bf16 on a CPU whose float32 path is
faster for wide calls, that path's rate), the best of three tries each. Its
price and power default to a cloud vCPU's share per thread on the CPU, and to the
table's row on a GPU the table knows by name; otherwise give ``--price-per-hour`` and
``--watts``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

from ..errors import BenchError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth: float  # peak memory bandwidth, bytes/s
    flops: float  # peak dense BF16 FLOP/s (local: the measured matmul rate in the run's dtype)
    usd_per_hour: float
    watts: float  # power drawn while busy (TDP: an upper bound for the energy)
    source: str  # "datasheet" or "measured"


DATASHEETS = {
    "h100": Hardware("H100 SXM 80GB", 3.35e12, 989e12, 2.99, 700, "datasheet"),
    "h200": Hardware("H200 SXM 141GB", 4.8e12, 989e12, 3.79, 700, "datasheet"),
    "a100": Hardware("A100 SXM 80GB", 2.039e12, 312e12, 1.79, 400, "datasheet"),
    "a5000": Hardware("RTX A5000", 768e9, 111.1e12, 0.27, 230, "datasheet"),
    "rtx4090": Hardware("RTX 4090", 1008e9, 165.2e12, 0.69, 450, "datasheet"),
}
NAMES = (*DATASHEETS, "local")

# local CPU: an on-demand general-purpose cloud vCPU (~$0.05/h) and a server core's share of its
# package TDP (~350 W / 56 cores), per thread the run uses
CPU_USD_PER_THREAD_HOUR = 0.05
CPU_WATTS_PER_THREAD = 6.0
LOCAL_PROBES = 3  # measurements of the local peaks; other work on the machine only lowers a measurement


def check_name(name: str) -> str:
    """``name`` lower-cased if the table knows it; else a BenchError listing the names it knows."""
    key = name.lower()
    if key not in NAMES:
        raise BenchError(f"unknown hardware {name!r}; known: {', '.join(NAMES)}")
    return key


def resolve(name: str, dtype: torch.dtype, device: torch.device, usd_per_hour: Optional[float] = None,
            watts: Optional[float] = None) -> Hardware:
    """The :class:`Hardware` called ``name`` (``local`` is measured now), with the given price and power."""
    key = check_name(name)
    hw = DATASHEETS.get(key) or _measure_local(dtype, device)
    hw = replace(hw, usd_per_hour=hw.usd_per_hour if usd_per_hour is None else usd_per_hour,
                 watts=hw.watts if watts is None else watts)
    if hw.usd_per_hour <= 0 or hw.watts <= 0:
        raise BenchError(f"no price and power known for {hw.name}; give --price-per-hour and --watts")
    return hw


def _measure_local(dtype: torch.dtype, device: torch.device) -> Hardware:
    import torch

    from ..runtime.machine import MachineProfile

    probes = [MachineProfile.measure(dtype, device) for _ in range(LOCAL_PROBES)]  # a peak: the best of a few
    # the best dense rate any path reaches: bf16 on CPUs without AMX multiplies wide calls in float32
    bandwidth, flops = max(p.copy_bps for p in probes), max(max(p.matmul_flops, p.wide_flops) for p in probes)
    if device.type == "cpu":
        threads = torch.get_num_threads()
        name = f"local CPU ({threads} thread{'s' if threads > 1 else ''})"
        usd, watts = CPU_USD_PER_THREAD_HOUR * threads, CPU_WATTS_PER_THREAD * threads
    else:
        name = f"local {torch.cuda.get_device_name(device)}"
        known = [hw for key, hw in DATASHEETS.items() if key.removeprefix("rtx").upper() in name.upper()]
        usd, watts = (known[0].usd_per_hour, known[0].watts) if known else (0.0, 0.0)
    return Hardware(name, bandwidth, flops, usd, watts, "measured")
