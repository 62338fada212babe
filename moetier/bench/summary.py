"""From a run's record to the numbers result.json holds: per phase, end to end, and cost.

A step that feeds any prompt tokens is a prefill step, every other one a decode step.
A phase's S-MBU (S-MFU) is its bytes (FLOPs) summed over its steps, divided by the sum
of their times and by the peak: the time-weighted mean of its steps' utilizations.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .hardware import Hardware
from .metrics import Step, kwh_per_million, percentiles, step_bytes, step_flops, usd_per_million, utilization
from .record import RunRecord
from .shape import ModelShape


def phase(steps: list[Step], shape: ModelShape, hw: Hardware) -> Optional[dict]:
    """Totals, rates and utilization over ``steps`` (None when there are none).

    ``tokens``: tokens fed (prefill: prompt tokens; decode: one per sequence per step, the
    tokens generated). ``activated_experts_per_step``: distinct experts per MoE layer per
    step, averaged over layers and steps; ``..._per_layer`` keeps the layers apart.
    """
    if not steps:
        return None
    seconds = sum(s.seconds for s in steps)
    tokens = sum(s.tokens for s in steps)
    nbytes = sum(step_bytes(shape, s) for s in steps)
    flops = sum(step_flops(shape, s) for s in steps)
    experts = np.array([s.experts for s in steps], dtype=np.float64)  # [steps, MoE layers]
    return {
        "steps": len(steps), "seconds": seconds, "tokens": tokens, "throughput_tok_s": tokens / seconds,
        "bytes_per_step": nbytes / len(steps), "flops_per_step": flops / len(steps),
        "s_mbu": utilization(nbytes, seconds, hw.bandwidth), "s_mfu": utilization(flops, seconds, hw.flops),
        "activated_experts_per_step": float(experts.mean()) if experts.size else 0.0,
        "activated_experts_per_layer": experts.mean(axis=0).round(3).tolist() if experts.size else [],
    }


def summarize(record: RunRecord, shape: ModelShape, hw: Hardware) -> dict:
    """The prefill, decode, end-to-end and cost sections of result.json."""
    prefill = phase([s for s in record.steps if s.prefill], shape, hw)
    decode = phase([s for s in record.steps if not s.prefill], shape, hw)
    if prefill is not None:
        prefill["ttft_s"] = percentiles(record.ttft)
    if decode is not None:
        decode["tpot_s"] = percentiles(record.itl)  # every gap between two tokens of a request
    out, secs = record.output_tokens, record.seconds
    return {
        "prefill": prefill,
        "decode": decode,
        "end_to_end": {"seconds": secs, "output_tokens": out, "throughput_tok_s": out / secs},
        "cost": {
            "usd_per_1m_output_tokens": usd_per_million(hw.usd_per_hour, secs, out),
            "kwh_per_1m_output_tokens": kwh_per_million(hw.watts, secs, out),
            "usd_per_hour": hw.usd_per_hour,
            "watts": hw.watts,
            "note": "hardware price per hour x the run's wall time / output tokens; energy at the hardware's "
                    "power (TDP: an upper bound), not included in the price",
        },
    }
