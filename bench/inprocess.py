"""In-process measurements: the model alone, through ONNX Runtime, without HTTP.

They give the ceiling the service is compared with, and the effect of length bucketing on
the sentiment model's batches. Timings are medians of several repeats, since the machines
are shared and noisy.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench import report
from bench.sections import BenchContext, Section
from dlserve import registry
from dlserve.runners.base import Runner

log = logging.getLogger("dlserve.bench")
BATCH_SIZES = (1, 8, 32, 64, 128, 256)
POOL = 256  # items per measurement, a multiple of every batch size


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


def ceiling(runner: Runner, make_part: Callable[[int], Any]) -> dict[str, Any]:
    """Items/s of runner.run_batch at each batch size, over the same POOL items each time
    (the same texts at every size, so sizes compare fairly); make_part(n) gives n items."""
    pool = make_part(POOL)
    rows = []
    for size in BATCH_SIZES:
        def run_pool(size: int = size) -> None:
            for i in range(0, POOL, size):
                runner.run_batch([pool[i: i + size]])

        seconds = median_seconds(run_pool, repeats=5) / (POOL // size)
        rows.append({"batch": size, "ms_per_batch": round(seconds * 1e3, 3),
                     "items_per_s": round(size / seconds)})
    best = max(rows, key=lambda r: r["items_per_s"])
    return {"model": runner.name, "provider": runner.provider, "by_batch": rows,
            "batch_1_items_per_s": rows[0]["items_per_s"], "best": best}


def bucketing(runner: Any, short: list[list[int]], long: list[list[int]],
              *, batch: int = 64, long_share: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """Sentiment batches of mostly short texts with a few long ones: length buckets against
    padding every text to the batch's longest."""
    rng = np.random.default_rng(seed)
    n_long = max(1, round(batch * long_share))
    seqs = [short[i] for i in rng.choice(len(short), batch - n_long)]
    seqs += [long[i] for i in rng.choice(len(long), n_long)]
    bucketed = median_seconds(lambda: runner.predict(seqs))
    padded = median_seconds(lambda: runner.predict(seqs, bucketed=False))
    lengths = [len(s) for s in seqs]
    return {
        "batch": batch, "long_texts": n_long,
        "tokens_real": sum(lengths), "tokens_padded": max(lengths) * batch,
        "ms_bucketed": round(bucketed * 1e3, 2), "ms_padded": round(padded * 1e3, 2),
        "speedup": round(padded / bucketed, 2),
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
