"""A one-minute soak (the CI-sized version of `dlserve bench --soak 60`): mixed valid and
invalid traffic on every route of every model, with bursts of large requests; no 5xx, no
socket errors, memory and open descriptors flat, each process's memory sampled and fitted,
and the plot drawn."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.main import run_bench
from bench.sections import BenchContext
from bench.soak import ProcessTracker, fit, render, soak
from dlserve import registry
from dlserve.settings import load_settings

# a minute of wrk load with bursts: no 5xx and flat memory, on a quiet machine
pytestmark = pytest.mark.exclusive

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (make test installs it with apt-get)"
)
def test_a_minute_of_mixed_traffic_leaks_nothing_and_breaks_nothing(
    digits_model: str, sentiment_model: str, recommender_model: str, tmp_path: Path
) -> None:
    settings = load_settings(workers=2)
    sources = {
        name: (spec.workload.load(), spec.data(settings))
        for name, spec in registry.serving(settings).items()
    }
    # 4 clients a burst, not the hour's 16: 2 cores serve 16 requests of 256 long texts in
    # 20-30 s, longer than a slice, and close to the request timeout (30 s).
    r = soak(
        BenchContext(settings, sources, 0, 0, 1, out=tmp_path),
        minutes=1,
        slice_s=15,
        burst_clients=4,
    )
    assert len(r["slices"]) == 4
    assert r["status_5xx"] == 0 and r["socket_errors"] == 0, r["slices"]
    for s in r["slices"]:
        assert s["status_2xx"] > 0 and s["status_4xx"] > 0, s  # both kinds went through
    assert r["rss_growth"] < 0.2, r["slices"]  # a short run: looser than the hour's 5 %
    assert r["fd_growth"] < 64, r["slices"]

    # Memory per process, by role: the supervisor and both workers, none replaced.
    roles = {name: p["role"] for name, p in r["processes"].items()}
    assert {"supervisor", "worker-1", "worker-2"} <= set(roles), roles
    assert roles["supervisor"] == "supervisor"
    assert roles["worker-1"] == roles["worker-2"] == "worker"
    assert r["restarts"] == 0, roles
    # Each has a slope, fitted after the warm-up (the first third of a short run); the
    # slope's target is the hour-long benchmark's, not this minute's.
    assert r["warm_up_s"] == 20
    for name, p in r["processes"].items():
        assert len(p["samples"]) >= 5, (name, p["samples"])
        assert p["fit"] is not None and math.isfinite(p["fit"]["pct_per_hour"]), (name, p)

    # A burst of large requests each slice, every request answered: served, or refused
    # with 503 + Retry-After; never another 5xx.
    assert len(r["bursts"]) == 4, r["bursts"]
    totals = r["burst_totals"]
    assert totals["status_2xx"] > 0, r["bursts"]
    assert totals["status_2xx"] + totals["status_503"] == sum(b["clients"] for b in r["bursts"]), r[
        "bursts"
    ]
    assert totals["status_5xx"] == totals["no_answer"] == 0, r["bursts"]

    plot = tmp_path / r["plot"]
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    markdown = "\n".join(render(r, {}))
    (tmp_path / "soak.md").write_text(markdown)  # beside the plot, for a look after a failure
    assert f"![Resident memory per process over the soak]({r['plot']})" in markdown
    assert "**Target: every process < 1 % of its RSS per hour after the warm-up, 0 5xx: " in (
        markdown
    )


def test_the_soak_runs_only_when_asked_for(tmp_path: Path) -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="the soak section needs --soak MINUTES"):
        run_bench(settings, out=tmp_path, only=["soak"], hold_s=1, short_s=1, rounds=1)


@dataclass
class FakeProcess:
    """What ProcessTracker reads of a psutil.Process."""

    pid: int
    parent: int
    worker: str | None
    mib: float = 100.0

    def ppid(self) -> int:
        return self.parent

    def cmdline(self) -> list[str]:
        return [
            "python",
            "-m",
            "_bentoml_impl.worker.service",
            *(["--worker-id", self.worker] if self.worker else []),
        ]

    def create_time(self) -> float:
        return float(self.pid)

    def name(self) -> str:
        return "python"

    def memory_info(self) -> SimpleNamespace:
        return SimpleNamespace(rss=int(self.mib * 2**20))


def test_each_process_is_a_series_by_role_and_a_replaced_worker_a_new_one() -> None:
    root, one, two = FakeProcess(10, 1, None), FakeProcess(12, 10, "2"), FakeProcess(11, 10, "1")
    tracker = ProcessTracker(root_pid=10)
    tracker.record(0.0, [root, one, two])
    tracker.record(10.0, [root, two, FakeProcess(13, 10, "2", mib=50)])  # worker 2 replaced
    assert {n: (s.role, s.pid, len(s.samples)) for n, s in tracker.series.items()} == {
        "supervisor": ("supervisor", 10, 2),
        "worker-1": ("worker", 11, 2),
        "worker-2": ("worker", 12, 1),
        "worker-2 (restart 1)": ("worker", 13, 1),
    }
    assert tracker.restarts == 1
    assert tracker.series["worker-2 (restart 1)"].samples == [(10.0, 50.0)]


def test_without_worker_ids_workers_are_named_by_creation_and_keep_their_slot() -> None:
    root = FakeProcess(10, 1, None)
    tracker = ProcessTracker(root_pid=10)
    tracker.record(0.0, [root, FakeProcess(21, 10, None), FakeProcess(20, 10, None)])
    tracker.record(5.0, [root, FakeProcess(21, 10, None), FakeProcess(30, 10, None)])
    assert {n: s.pid for n, s in tracker.series.items()} == {
        "supervisor": 10,
        "worker-1": 20,
        "worker-2": 21,
        "worker-1 (restart 1)": 30,
    }


def test_the_fit_is_the_slope_after_the_warm_up_as_a_share_of_its_start_per_hour() -> None:
    # Flat 500 MiB during the warm-up, then 1 MiB a minute from 1,000 MiB: 6 % an hour.
    samples = [(t, 500.0) for t in range(0, 300, 10)]
    samples += [(t, 1000.0 + (t - 300) / 60) for t in range(300, 1200, 10)]
    f = fit(samples, from_s=300)
    assert f is not None
    assert f["start_mib"] == pytest.approx(1000.0)
    assert f["mib_per_hour"] == pytest.approx(60.0)
    assert f["pct_per_hour"] == pytest.approx(6.0)
    assert fit(samples[:2], from_s=0) is None  # too few samples: no slope
