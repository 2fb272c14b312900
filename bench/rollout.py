"""`dlserve bench --only rollout`: switching a model's version while clients are served.

One dlserve server (its default workers, DLSERVE_MODEL_CONTROL=true) on a model store of
its own: the served model's newest version, and the same files published again as a newer
version (as a retraining that changed nothing would). wrk holds CLIENTS connections
sending one-item requests for WINDOW_S seconds twice: once steady, once while, a quarter
of the way in, the older version is rolled out (POST /v2/repository/models/{name}/load,
which returns once every worker serves it) and, two thirds of the way in, rolled back.
The report sets the two windows side by side: requests, failures, p50/p99, and how long
each call took.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench import http, report
from bench.compare import requests_for
from bench.sections import BenchContext, Section

MODEL = "digits"  # when served; else the first model
CLIENTS = 32
WINDOW_S = 20.0
ROLLOUT_AT, ROLLBACK_AT = 0.25, 2 / 3  # of the window

# Run with the new store's BENTOML_HOME: publishes model SOURCE_DIR's files twice.
PUBLISH = """
import shutil, sys
from pathlib import Path
import bentoml
from dlserve.manifest import MANIFEST_FILE, ONNX_FILE, read_manifest
source = Path(sys.argv[1])
manifest = read_manifest(source)
for _ in range(2):
    with bentoml.models.create(manifest.name, labels={"framework": "onnx",
            "task": manifest.task, "precision": manifest.precision},
            metadata=manifest.summary()) as model:
        for name in (ONNX_FILE, MANIFEST_FILE):
            shutil.copyfile(source / name, Path(model.path) / name)
        print(model.tag)
"""


def store_of_two(model: str, source_dir: str) -> tuple[Path, list[str]]:
    """A BENTOML_HOME holding two versions of `model` (older first), and their tags."""
    home = Path(tempfile.mkdtemp(prefix="dlserve-rollout-home-"))
    out = subprocess.run(
        [sys.executable, "-c", PUBLISH, source_dir],
        capture_output=True,
        text=True,
        env={**os.environ, "BENTOML_HOME": str(home)},
        timeout=300,
    )
    if out.returncode != 0:
        shutil.rmtree(home, ignore_errors=True)
        raise RuntimeError(f"bench: rollout: could not make its model store: {out.stderr[-2000:]}")
    return home, out.stdout.split()


def timed_load(url: str, model: str, parameters: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    r = httpx.post(
        f"{url}/v2/repository/models/{model}/load", json={"parameters": parameters}, timeout=600
    )
    return {
        "status": r.status_code,
        "seconds": round(time.perf_counter() - started, 2),
        "answer": r.json(),
    }


def run(ctx: BenchContext) -> dict[str, Any]:
    model = MODEL if MODEL in ctx.sources else next(iter(ctx.sources))
    import bentoml  # the bench's own store, where the served version is

    from dlserve import store

    served = store.latest(model, ctx.settings.precision)
    if served is None:
        return {"skipped": f"{model} has no {ctx.settings.precision} version in the store"}
    home, (older, newer) = store_of_two(model, bentoml.models.get(served).path)
    server = http.dlserve_server(
        "rollout",
        [model],
        BENTOML_HOME=str(home),
        DLSERVE_MODEL_CONTROL="true",
        DLSERVE_WORKERS=str(ctx.settings.workers),
    )
    requests = requests_for(model, 1, "json", ctx.sources)
    calls: list[dict[str, Any]] = []

    def switch() -> None:
        time.sleep(WINDOW_S * ROLLOUT_AT)
        calls.append({"call": "rollout", **timed_load(server.url, model, {"version": older})})
        time.sleep(max(0.0, WINDOW_S * ROLLBACK_AT - WINDOW_S * ROLLOUT_AT - calls[-1]["seconds"]))
        calls.append({"call": "rollback", **timed_load(server.url, model, {"rollback": True})})

    server.start()
    try:
        http.run_wrk(server.url, requests, clients=CLIENTS, duration_s=2)  # warm-up
        steady = http.run_wrk(server.url, requests, clients=CLIENTS, duration_s=WINDOW_S)
        switcher = threading.Thread(target=switch)
        switcher.start()
        during = http.run_wrk(server.url, requests, clients=CLIENTS, duration_s=WINDOW_S)
        switcher.join()
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
    return {
        "model": model,
        "clients": CLIENTS,
        "window_s": WINDOW_S,
        "workers": ctx.settings.workers,
        "versions": [older, newer],
        "steady": steady,
        "during": during,
        "calls": calls,
    }


def render(r: dict[str, Any], sections: dict[str, Any]) -> list[str]:
    title = "## Rollout under load"
    if "skipped" in r:
        return [title, "", f"Not measured in this run: {r['skipped']}.", ""]
    rows = [
        [
            name,
            f"{w['requests']:,}",
            f"{w['requests_per_s']:,.0f}",
            w["non_2xx"] + w["socket_errors"],
            report.ms(w["p50"]),
            report.ms(w["p99"]),
            report.ms(w["max"]),
        ]
        for name, w in (("steady", r["steady"]), ("rollout and rollback", r["during"]))
    ]
    calls = "; ".join(f"{c['call']} {c['status']} in {c['seconds']:g} s" for c in r["calls"])
    return [
        title,
        "",
        f"{r['model']}, one item per request, {r['clients']} wrk clients, {r['workers']} "
        f"workers, two {r['window_s']:g}-s windows: one steady, one in which the server "
        f"switches from {r['versions'][1]} to {r['versions'][0]} a quarter of the way in "
        "(`POST /v2/repository/models/{name}/load`, which returns once every worker serves "
        'it) and back two thirds of the way in (`{"rollback": true}`) '
        f"(`dlserve bench --only rollout`; docs/rollout.md). Calls: {calls}.",
        "",
        report.table(
            ["window", "requests", "requests/s", "failed", "p50 ms", "p99 ms", "max ms"], rows
        ),
        "",
    ]


SECTION = Section("rollout", run, render)
