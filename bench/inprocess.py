"""In-process measurements: the model alone, through ONNX Runtime, without HTTP.

They give the ceiling the service is compared with, and whatever each model's workload
adds (the effect of length bucketing on the sentiment model's batches: bench/workloads.py).
Timings are medians of several repeats (bench/timing.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from bench import report
from bench.sections import BenchContext, Section
from bench.timing import median_seconds
from dlserve import registry
from dlserve.runners.base import Runner

log = logging.getLogger("dlserve.bench")
BATCH_SIZES = (1, 8, 32, 64, 128, 256)
POOL = 256  # items per measurement, a multiple of every batch size


def ceiling(runner: Runner, make_part: Callable[[int], Any]) -> dict[str, Any]:
    """Items/s of runner.run_batch at each batch size, over the same POOL items each time
    (the same texts at every size, so sizes compare fairly); make_part(n) gives n items."""
    pool = make_part(POOL)
    rows = []
    for size in BATCH_SIZES:

        def run_pool(size: int = size) -> None:
            for i in range(0, POOL, size):
                runner.run_batch([pool[i : i + size]])

        seconds = median_seconds(run_pool, repeats=5) / (POOL // size)
        rows.append(
            {
                "batch": size,
                "ms_per_batch": round(seconds * 1e3, 3),
                "items_per_s": round(size / seconds),
            }
        )
    best = max(rows, key=lambda r: r["items_per_s"])
    return {
        "model": runner.name,
        "provider": runner.provider,
        "by_batch": rows,
        "batch_1_items_per_s": rows[0]["items_per_s"],
        "best": best,
    }


def run(ctx: BenchContext) -> dict[str, Any]:
    """Every served model's ceiling, and the measurements its workload adds."""
    results: dict[str, Any] = {"ceiling": []}
    for name, (workload, source) in ctx.sources.items():
        runner = registry.load_runner(name, ctx.settings)
        log.info("bench: %s in-process ceiling", name)
        results["ceiling"].append(ceiling(runner, workload.parts(runner, source)))
        if workload.extra is not None:
            results.update(workload.extra(runner, source))
    return results


SECTION = Section("inprocess", run, report.render_inprocess)
