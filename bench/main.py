"""`dlserve bench`: the sections of the benchmark, run for every served model, into
BENCHMARKS.md and benchmarks.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bench import (
    batch,
    burst,
    compare,
    inprocess,
    memory,
    perf_analyzer,
    precision,
    profile,
    report,
    rollout,
    soak,
)
from bench.sections import BenchContext, Section
from bench.workloads import Workload
from dlserve import registry
from dlserve.registry import DataSource
from dlserve.settings import Settings

log = logging.getLogger("dlserve.bench")
# In the order of the report. A new measurement is one more Section here.
SECTIONS: tuple[Section, ...] = (
    inprocess.SECTION,
    memory.SECTION,
    precision.SECTION,
    compare.SECTION,
    batch.SECTION,
    profile.SECTION,
    perf_analyzer.SECTION,
    burst.SECTION,
    rollout.SECTION,
    soak.SECTION,
)
# Sections that run only when asked for with their own option: the soak takes an hour.
ON_REQUEST = {"soak": "--soak MINUTES"}


def select(only: list[str] | None, skip: list[str] | None, requested: set[str]) -> list[Section]:
    """The sections to run: --only's, or all but --skip's; an on-request section only when
    its option (`requested`) asked for it."""
    names = [s.name for s in SECTIONS]
    unknown = [n for n in (only or []) + (skip or []) if n not in names]
    if unknown:
        raise ValueError(f"unknown bench section(s) {unknown}; choose from {', '.join(names)}")
    for name in only or []:
        if name in ON_REQUEST and name not in requested:
            raise ValueError(f"the {name} section needs {ON_REQUEST[name]}")
    return [
        s
        for s in SECTIONS
        if (not only or s.name in only)
        and s.name not in (skip or [])
        and (s.name not in ON_REQUEST or s.name in requested)
    ]


def run_bench(
    settings: Settings,
    *,
    out: Path,
    only: list[str] | None = None,
    skip: list[str] | None = None,
    hold_s: float,
    short_s: float,
    rounds: int,
    soak_minutes: float = 0.0,
) -> Path:
    """Run the chosen sections for every model of the settings (DLSERVE_MODELS); write
    BENCHMARKS.md and benchmarks.json into `out`, keeping the last results of the sections
    not run, and return the former's path."""
    chosen = select(only, skip, {"soak"} if soak_minutes > 0 else set())
    sources: dict[str, tuple[Workload, DataSource]] = {
        name: (spec.workload.load(), spec.data(settings))
        for name, spec in registry.serving(settings).items()
    }
    ctx = BenchContext(settings, sources, hold_s, short_s, rounds, soak_minutes, out)
    path = out / "benchmarks.json"
    results: dict[str, Any] = {}
    if len(chosen) < len(SECTIONS) and path.is_file():
        results = json.loads(path.read_text()).get("sections", {})
    out.mkdir(parents=True, exist_ok=True)
    for section in chosen:
        log.info("bench: section %s", section.name)
        results[section.name] = {"machine": report.machine(), **section.run(ctx)}
        # Written after each section: a later one that fails loses only itself.
        path.write_text(json.dumps({"sections": results}, indent=1) + "\n")
        (out / "BENCHMARKS.md").write_text(report.render(results, list(SECTIONS)))
    return out / "BENCHMARKS.md"
