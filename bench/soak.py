"""`dlserve bench --soak MINUTES`: a long run of mixed traffic, sampled every minute.

Every route of every served model (the JSON routes, the image route, the Open Inference
Protocol), valid and invalid requests mixed (each workload's `mixed`), from 64 clients
for MINUTES one-minute slices against one dlserve server with its defaults. After each
slice: the server's resident memory and open file descriptors (all its processes), the
slice's p99 latency and its answers by status class. A server that leaks grows in the
first two; one that breaks shows 5xx. Not a CI test: CI runs a one-minute soak
(tests/test_soak.py) that checks the same things on a short scale.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

import psutil

from bench import http, report
from bench.sections import BenchContext, Section

log = logging.getLogger("dlserve.bench")
CLIENTS = 64
WARM_UP_SLICES = 1  # memory grows while caches and allocators settle; compared from here
ITEMS_PER_MODEL = 64
SLICE_S = 60.0


def sample(server: http.Server) -> dict[str, float]:
    """RSS (MiB) and open file descriptors over the server's processes."""
    assert server.process is not None
    root = psutil.Process(server.process.pid)
    rss, fds = 0, 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            rss += proc.memory_info().rss
            fds += proc.num_fds()
        except psutil.Error:  # a worker exiting between the listing and the reading
            continue
    return {"rss_mib": round(rss / 2**20, 1), "fds": fds}


def soak(ctx: BenchContext, minutes: float, slice_s: float = SLICE_S) -> dict[str, Any]:
    requests = [r for workload, source in ctx.sources.values() if workload.mixed is not None
                for r in workload.mixed(source, ITEMS_PER_MODEL)]
    server = http.dlserve_server("dlserve", list(ctx.sources),
                                 DLSERVE_WORKERS=str(ctx.settings.workers))
    slices = []
    server.start()
    try:
        started = sample(server)
        for i in range(max(1, round(minutes * 60 / slice_s))):
            result = http.run_wrk_mixed(server.url, requests, clients=CLIENTS,
                                        duration_s=slice_s)
            slices.append({"slice": i + 1, **result, **sample(server)})
            log.info("bench: soak slice %d: %s", i + 1, slices[-1])
    finally:
        server.stop()
    base = slices[min(WARM_UP_SLICES, len(slices) - 1)]
    last = slices[-1]
    return {"minutes": minutes, "slice_s": slice_s, "clients": CLIENTS,
            "workers": ctx.settings.workers, "distinct_requests": len(requests),
            "at_start": started, "slices": slices,
            "rss_growth": round(last["rss_mib"] / base["rss_mib"] - 1, 4),
            "fd_growth": last["fds"] - base["fds"],
            "status_5xx": sum(s["status_5xx"] for s in slices),
            "socket_errors": sum(s["socket_errors"] for s in slices)}


def run(ctx: BenchContext) -> dict[str, Any]:
    return soak(ctx, ctx.soak_minutes)


def render(r: dict[str, Any], _: dict[str, Any]) -> list[str]:
    rows = [[s["slice"], f"{s['requests_per_s']:,.0f}", s["p99"], s["status_2xx"],
             s["status_4xx"], s["status_5xx"], s["socket_errors"], s["rss_mib"], s["fds"]]
            for s in r["slices"]]
    p99 = statistics.median(s["p99"] for s in r["slices"])
    return [
        "## Soak: mixed traffic, sampled every minute",
        "",
        f"{r['minutes']:g} minutes of every route of every model, valid and invalid requests "
        f"mixed ({r['distinct_requests']} distinct requests, replayed by wrk), {r['clients']} "
        f"clients, {r['workers']} workers, one dlserve server with its defaults "
        f"(`dlserve bench --soak {r['minutes']:g}`). After each {r['slice_s']:g} s slice: "
        "throughput, p99, answers by status class (the 4xx are the invalid requests), and "
        "the server's resident memory and open file descriptors over all its processes. "
        f"At start: {r['at_start']['rss_mib']} MiB, {r['at_start']['fds']} descriptors.",
        "",
        report.table(["slice", "requests/s", "p99 ms", "2xx", "4xx", "5xx", "socket errors",
                      "RSS MiB", "open fds"], rows),
        "",
        f"Memory from slice {WARM_UP_SLICES + 1} to the last: {r['rss_growth']:+.1%} "
        f"(target < 5 %); descriptors: {r['fd_growth']:+d}; 5xx: {r['status_5xx']}; "
        f"median p99 {p99} ms.",
        "",
    ]


SECTION = Section("soak", run, render)
