"""The parts of `dlserve bench`: each measures one thing and renders its part of
BENCHMARKS.md, so that a new measurement is one more `Section` in bench/main.py.

`dlserve bench --only NAME` runs some sections and keeps the others' last results (from
benchmarks.json); each section records when and on what machine it was measured, and the
report says so beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.workloads import Workload
from dlserve.registry import DataSource
from dlserve.settings import Settings

Results = dict[str, Any]


@dataclass(frozen=True)
class BenchContext:
    settings: Settings
    # every served model's workload and data, by name (DLSERVE_MODELS, in order)
    sources: dict[str, tuple[Workload, DataSource]]
    hold_s: float  # seconds of each held run (the cells targets are judged on)
    short_s: float  # seconds of every other run
    rounds: int  # runs of each held cell per server
    soak_minutes: float = 0.0  # the soak section's length; 0: no soak
    # where BENCHMARKS.md goes: a section that draws a figure writes it under this folder
    # and keeps its path, relative to it, in its results (None: draw nothing)
    out: Path | None = None


@dataclass(frozen=True)
class Section:
    name: str  # its key in benchmarks.json and its word for --only / --skip
    run: Callable[[BenchContext], Results]
    # (this section's results, every section's results) → Markdown lines
    render: Callable[[Results, dict[str, Results]], list[str]]
