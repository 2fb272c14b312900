"""`dlserve bench` end to end on the digits model: real servers (the naive FastAPI peer and
dlserve), real wrk load, a BENCHMARKS.md and a JSON file; and the naive peer's answers."""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from bench import http, workloads
from dlserve.registry import DataSource
from tests.conftest import dlserve

needs_wrk = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (make test installs it with apt-get)"
)


def test_naive_peer_answers_like_the_service(
    digits_model: str, client: httpx.Client, data_dir: Path
) -> None:
    naive = http.naive_server(["digits"])
    try:
        naive.start()
        source = DataSource(data_dir, None)
        for path, body in workloads.digits_requests(source, 3, 2) + workloads.digits_requests(
            source, 3, 2, "base64"
        ):
            ours = client.post(path, content=body, headers={"Content-Type": "application/json"})
            theirs = httpx.post(
                naive.url + path,
                content=body,
                headers={"Content-Type": "application/json"},
                timeout=30,
            )
            assert ours.status_code == theirs.status_code == 200
            a, b = ours.json()["predictions"], theirs.json()["predictions"]
            assert [p["digit"] for p in a] == [p["digit"] for p in b]
            np.testing.assert_allclose(
                [p["probabilities"] for p in a], [p["probabilities"] for p in b], atol=1e-6
            )
    finally:
        naive.stop()
    assert naive.process is not None and naive.process.poll() is not None


def test_batch_stats_reads_the_batch_histogram_of_every_worker() -> None:
    text = """# HELP dlserve_batch_items Items per model run
dlserve_batch_items_sum{model="digits"} 120.0
dlserve_batch_items_count{model="digits"} 10.0
dlserve_batch_items_sum{model="sentiment"} 64.0
dlserve_batch_items_count{model="sentiment"} 2.0
dlserve_batch_items_bucket{le="1.0",model="digits"} 3.0
"""
    before = http.batch_stats(text)
    assert before == {"digits": (120.0, 10.0), "sentiment": (64.0, 2.0)}
    after = {"digits": (220.0, 15.0), "sentiment": (64.0, 2.0)}
    assert http.mean_batch(before, after) == 20.0
    assert http.mean_batch(before, before) is None


@needs_wrk
def test_bench_compares_servers_under_real_load(
    digits_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DLSERVE_MODELS", "digits")
    monkeypatch.setenv("DLSERVE_WORKERS", "2")
    # Every process the bench starts inherits this variable: the check at the end finds
    # what it left by it, whatever other tests run beside this one.
    mark = {"DLSERVE_TEST_BENCH_RUN": uuid.uuid4().hex}
    # (the batch section scores 100,000 images; tests/test_score.py runs it on fewer)
    out = dlserve(
        "bench",
        "--out",
        str(tmp_path),
        "--hold-s",
        "1",
        "--short-s",
        "1",
        "--rounds",
        "2",
        "--skip",
        "batch,profile,perf_analyzer,precision,memory,burst",
        env=mark,
    )
    assert out.stdout.strip().endswith("BENCHMARKS.md")
    results = json.loads((tmp_path / "benchmarks.json").read_text())
    runs = results["sections"]["http"]["runs"]
    # 3 servers × (1 item, 32 items as JSON, 32 items as base64) × (1, 16, 64 clients), a
    # second round of the held cell (1 item, 64 clients), which the 4 peers also run twice
    core = ("naive", "dlserve-unbatched", "dlserve")
    peers = ("lean", "ceiling", "bentoml-batchable", "litserve")
    assert len(runs) == 27 + 3 + 4 * 2
    held = [r for r in runs if r["items"] == 1 and r["clients"] == 64]
    assert sorted((r["server"], r["round"]) for r in held) == sorted(
        (s, n) for s in core + peers for n in (1, 2)
    )
    # Half-way through each run, the server's processes held all 64 connections between them,
    # or had them queued to accept (the servers that take part in every cell: the balance
    # figures are theirs). A read can see one or two more: a connection dlserve has just
    # closed (DLSERVE_KEEPALIVE_REQUESTS) beside the client's new one (65 seen here).
    splits = {
        (r["server"], r["round"]): (r["connections"], r["unaccepted"])
        for r in held
        if r["server"] in core
    }
    short = {
        run: seen for run, seen in splits.items() if sum(seen[0]) + seen[1] not in range(60, 67)
    }
    assert not short, short
    assert {r["server"] for r in runs if r not in held} == set(core)
    for r in runs:
        assert r["requests"] > 0, r
        assert r["non_2xx"] == 0 and r["socket_errors"] == 0, r
        assert 0 < r["p50"] <= r["p95"] <= r["p99"], r
        assert r["items_per_s"] == pytest.approx(r["requests_per_s"] * r["items"], rel=1e-3)
    batched = [r["mean_batch"] for r in runs if r["server"] == "dlserve"]
    assert all(b >= 1 for b in batched)
    # 32-image requests run at least 32 images per model call: batches are whole requests.
    assert all(r["mean_batch"] >= 32 for r in runs if r["server"] == "dlserve" and r["items"] == 32)
    # Unbatched, every model run is exactly one request; the peers have no such metric.
    assert all(r["mean_batch"] == r["items"] for r in runs if r["server"] == "dlserve-unbatched")
    assert all(r["mean_batch"] is None for r in runs if r["server"] in ("naive", *peers))
    assert {r["workers"] for r in results["sections"]["http"]["worker_runs"]} == {1, 2}
    # Each server's CPU while idle was measured (the servers not under load are paused).
    assert set(results["sections"]["http"]["idle_cpu"]) == {*core, *peers}
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "idle cores" in md
    for heading in (
        "## In-process ceiling",
        "## Over HTTP",
        "### Targets",
        "### Every cell",
        "### Against every peer",
        "### Round by round",
        "### Worker processes",
    ):
        assert heading in md
    assert "digits: ≥ 0.6× the lean hand-written peer" in md and "≥ 2× litserve" in md
    # A section run alone keeps the others' last results.
    dlserve("bench", "--out", str(tmp_path), "--only", "inprocess")
    again = json.loads((tmp_path / "benchmarks.json").read_text())["sections"]
    assert again["http"] == results["sections"]["http"]
    before = results["sections"]["inprocess"]["machine"]["date"]
    assert again["inprocess"]["machine"]["date"] >= before
    assert "## Over HTTP" in (tmp_path / "BENCHMARKS.md").read_text()
    # Every server the bench started is gone.
    assert not started_with(mark), started_with(mark)


def started_with(env: dict[str, str]) -> list[str]:
    """The command lines of the running processes whose environment holds `env`."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if env.items() <= p.environ().items():
                found.append(" ".join(p.cmdline()))
    return found


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("--hold-s", "2.5", "invalid int value"),  # wrk takes whole seconds
        ("--short-s", "0", "--short-s: must be at least 1"),
        ("--rounds", "0", "--rounds: must be at least 1"),
    ],
)
def test_bench_refuses_durations_wrk_cannot_run(
    tmp_path: Path, option: str, value: str, error: str
) -> None:
    out = dlserve(
        "bench", "--out", str(tmp_path), option, value, "--only", "inprocess", check=False
    )
    assert out.returncode == 2 and error in out.stderr, out.stderr[-500:]
    assert not (tmp_path / "benchmarks.json").exists()
