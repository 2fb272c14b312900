"""`dlserve bench`: every served model in-process, then over HTTP, into BENCHMARKS.md."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bench import inprocess, report
from bench.workloads import Workload
from dlserve import registry
from dlserve.registry import DataSource
from dlserve.settings import Settings

log = logging.getLogger("dlserve.bench")


def run_bench(settings: Settings, *, out: Path, http: bool, hold_s: float, short_s: float,
              rounds: int) -> Path:
    """Measure every model of the settings (DLSERVE_MODELS); write BENCHMARKS.md and
    benchmarks.json into `out` and return the former's path."""
    sources: dict[str, tuple[Workload, DataSource]] = {}
    results: dict[str, Any] = {"machine": report.machine(), "ceiling": []}
    for name, spec in registry.serving(settings).items():
        workload: Workload = spec.workload.load()
        source = spec.data(settings)
        sources[name] = (workload, source)
        runner = spec.load_runner(settings)
        log.info("bench: %s in-process ceiling", name)
        results["ceiling"].append(inprocess.ceiling(runner, workload.parts(runner, source)))
        if workload.extra is not None:
            log.info("bench: %s, its own measurements", name)
            results.update(workload.extra(runner, source))
    if http:
        from bench import compare

        results["http"] = compare.run(sources, workers=settings.workers, hold_s=hold_s,
                                      short_s=short_s, rounds=rounds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "BENCHMARKS.md").write_text(report.render(results))
    return out / "BENCHMARKS.md"
