"""How the bench times a call: the median of several repeats, since the machines are
shared and noisy. Apart from the sections so that workloads can time their own extras."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_seconds(fn: Callable[[], Any], *, repeats: int = 7, min_time_s: float = 0.2) -> float:
    """Median seconds per call of `fn`; each repeat loops until it has run min_time_s."""
    fn()  # warm-up
    per_call = []
    for _ in range(repeats):
        n, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < min_time_s or n == 0:
            fn()
            n += 1
        per_call.append(elapsed / n)
    return statistics.median(per_call)
