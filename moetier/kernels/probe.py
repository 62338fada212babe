"""What the load-time kernel probes share: a row count fixed from the environment, and a median time."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Optional


def fixed_rows(env: str, what: str) -> Optional[int]:
    """The row count ``env`` fixes instead of a probe (``None`` when unset); a bad value is an error naming it."""
    fixed = os.environ.get(env, "").strip()
    if not fixed:
        return None
    try:
        return int(fixed)
    except ValueError:
        raise ValueError(f"{env}={fixed!r}: expected a row count (0 turns {what} off)") from None


def median_s(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def best_s(fn: Callable[[], object], repeats: int = 5) -> float:
    """Shortest wall time of ``fn()`` over ``repeats`` calls after one warm-up call: the machine's rate, least
    disturbed by other work on the same cores (a probe that only compares two kernels)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best
