"""A one-minute soak (the CI-sized version of `dlserve bench --soak 60`): mixed valid and
invalid traffic on every route of every model; no 5xx, no socket errors, memory and open
descriptors flat."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.main import run_bench
from bench.sections import BenchContext
from bench.soak import soak
from dlserve import registry
from dlserve.settings import load_settings


@pytest.mark.skipif(shutil.which("wrk") is None,
                    reason="wrk is not installed (make test installs it with apt-get)")
def test_a_minute_of_mixed_traffic_leaks_nothing_and_breaks_nothing(
        digits_model: str, sentiment_model: str, recommender_model: str) -> None:
    settings = load_settings(workers=2)
    sources = {name: (spec.workload.load(), spec.data(settings))
               for name, spec in registry.serving(settings).items()}
    r = soak(BenchContext(settings, sources, 0, 0, 1), minutes=1, slice_s=15)
    assert len(r["slices"]) == 4
    assert r["status_5xx"] == 0 and r["socket_errors"] == 0, r["slices"]
    for s in r["slices"]:
        assert s["status_2xx"] > 0 and s["status_4xx"] > 0, s  # both kinds went through
    assert r["rss_growth"] < 0.2, r["slices"]  # a short run: looser than the hour's 5 %
    assert r["fd_growth"] < 64, r["slices"]


def test_the_soak_runs_only_when_asked_for(tmp_path: Path) -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="the soak section needs --soak MINUTES"):
        run_bench(settings, out=tmp_path, only=["soak"], hold_s=1, short_s=1, rounds=1)
