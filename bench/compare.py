"""The side-by-side HTTP benchmark: the naive FastAPI peer, dlserve without adaptive
batching, and dlserve as configured, on the same payloads, interleaved cell by cell.

Every server is started once and they take turns under load, in a rotating order, so that
slow drifts of a shared machine hit every server alike; the ones not under load are paused
(SIGSTOP), since some spin while idle (LitServe's inference loops poll their queues). The cells
the targets are judged on (64 clients, single items, and mixed) run several rounds, and
the report takes medians: one run can be off by 2× when a burst of new connections all
lands on one worker of a server (BENCHMARKS.md, "Connection balance").
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench import http, report
from bench.sections import BenchContext, Section
from bench.workloads import Request, Workload
from dlserve.registry import DataSource

log = logging.getLogger("dlserve.bench")
CLIENTS = (1, 16, 64)
ITEMS = (1, 32)
POOL = 256  # distinct requests per payload kind, replayed in a cycle
WARM_UP_S = 1.0
OVERLOAD_CLIENTS = 512
SPLIT_READS = (0.4, 0.5, 0.6)  # when the connection split is read, as shares of a run


@dataclass(frozen=True)
class Cell:
    """One load pattern: `clients` connections sending `items`-item requests to `model`."""

    model: str  # a model name, or "mixed" (all models, requests interleaved)
    items: int
    clients: int
    duration_s: float
    encoding: str = "json"  # "base64": digits' compact images_base64 field
    rounds: int = 1  # runs per server, each `duration_s` long
    peers: bool = False  # the framework and hand-written peers take part too


def plan(
    workloads: dict[str, Workload], *, hold_s: float, short_s: float, rounds: int = 1
) -> list[Cell]:
    """Every model at 1/16/64 clients with 1- and 32-item requests (unless its requests
    carry one item by design, as the recommender's do: one user), each multi-item encoding
    the model's workload has (digits: JSON numbers and base64), and a mixed run; single-item
    runs at 64 clients are held for `hold_s`, `rounds` times per server, and the peers run
    them too; the rest run once for `short_s`."""
    cells = []
    for model, workload in workloads.items():
        for items in ITEMS if workload.multi_item else (1,):
            for encoding in workload.encodings if items > 1 else ("json",):
                for clients in CLIENTS:
                    held = clients == max(CLIENTS) and items == 1
                    cells.append(
                        Cell(
                            model,
                            items,
                            clients,
                            hold_s if held else short_s,
                            encoding,
                            rounds if held else 1,
                            peers=held,
                        )
                    )
    if len(workloads) > 1:
        cells.append(Cell("mixed", 1, max(CLIENTS), hold_s, rounds=rounds))
    return cells


Sources = dict[str, tuple[Workload, DataSource]]


def requests_for(model: str, items: int, encoding: str, sources: Sources) -> list[Request]:
    if model == "mixed":
        parts = [requests_for(m, 1, "json", sources) for m in sources]
        return [r for group in zip(*parts, strict=True) for r in group]
    workload, source = sources[model]
    return workload.requests(source, items, POOL, encoding)


def measure(
    server: http.Server, requests: list[Request], clients: int, duration_s: float
) -> dict[str, Any]:
    """One wrk run after a short warm-up; dlserve's mean batch size from its /metrics, and
    how the clients' connections were split over the server's processes half-way through
    (the fullest of three reads around then)."""
    http.run_wrk(server.url, requests, clients=clients, duration_s=WARM_UP_S)
    scrape = server.batch_metrics
    before = http.batch_stats(server.metrics_text()) if scrape else {}
    readings: list[tuple[list[int], int]] = []
    done = threading.Event()

    def sample() -> None:
        # Three reads around half-way, keeping the fullest: dlserve closes a keep-alive
        # connection now and then (service/guard.py), and a read that lands while a client
        # reconnects misses it: on CI's loaded machine one read saw fewer than 60 of 64.
        for at in SPLIT_READS:
            if done.wait(duration_s * at - (time.monotonic() - started)):
                return
            readings.append(server.connection_split())

    started = time.monotonic()
    sampler = threading.Thread(target=sample, name="bench-split", daemon=True)
    sampler.start()
    try:
        result = http.run_wrk(server.url, requests, clients=clients, duration_s=duration_s)
    finally:
        done.set()
        sampler.join()
    split, waiting = max(readings, key=lambda r: sum(r[0]) + r[1], default=([], 0))
    result["mean_batch"] = (
        http.mean_batch(before, http.batch_stats(server.metrics_text())) if scrape else None
    )
    result["connections"] = split
    result["unaccepted"] = waiting
    return result


def run_cells(
    servers: list[http.Server],
    cells: list[Cell],
    sources: Sources,
    peers: list[http.Server] | None = None,
) -> list[dict[str, Any]]:
    """Every cell on every server (and, for a cell that asks, every peer that can serve
    its model), taking turns in a rotating order, round after round."""
    rows = []
    pools: dict[tuple[str, int, str], list[Request]] = {}  # one per payload, not per cell
    turn = 0
    for cell in cells:
        payload = (cell.model, cell.items, cell.encoding)
        if payload not in pools:
            pools[payload] = requests_for(*payload, sources)
        requests = pools[payload]
        taking_part = servers + [p for p in peers or [] if cell.peers and p.can_serve(cell.model)]
        for round_ in range(1, cell.rounds + 1):
            shift = turn % len(taking_part)
            turn += 1
            for server in taking_part[shift:] + taking_part[:shift]:
                server.resume()
                log.info(
                    "bench: %s %s × %d items, %d clients, %g s (round %d of %d)",
                    server.name,
                    cell.model,
                    cell.items,
                    cell.clients,
                    cell.duration_s,
                    round_,
                    cell.rounds,
                )
                result = measure(server, requests, cell.clients, cell.duration_s)
                server.pause()
                result["items_per_s"] = round(result["requests_per_s"] * cell.items, 1)
                rows.append({**asdict(cell), "round": round_, "server": server.name, **result})
    return rows


def with_servers(servers: list[http.Server], body: Any) -> Any:
    """Start every server, run body(), and stop them all whatever happens.

    The servers start at once and settle together; then each one's idle use is measured
    while the others are stopped (SIGSTOP), since one that spins while idle would take CPU
    from the others' measurements. One after the other, starting and settling took 5 s
    more per server."""
    try:
        log.info("bench: starting %s", ", ".join(s.name for s in servers))
        for server in servers:
            server.start(wait=False)
        for server in servers:
            server.wait_until_ready()
        time.sleep(http.IDLE_SETTLE_S)
        for server in servers:
            server.signal_all(signal.SIGSTOP)
        for server in servers:
            server.signal_all(signal.SIGCONT)
            log.info(
                "bench: %s uses %.2f cores while idle",
                server.name,
                server.measure_idle(settle=False),
            )
            server.signal_all(signal.SIGSTOP)
            server.paused = True
        return body()
    finally:
        for server in servers:
            server.stop()


def run(
    sources: Sources, *, workers: int, hold_s: float, short_s: float, rounds: int
) -> dict[str, Any]:
    """The whole HTTP comparison, plus two single-purpose runs: the worker count (the first
    model, one item per request, 64 clients, 1 worker against `workers`) and overload (the
    model whose workload is marked for it, sentiment: 32 items per request from
    OVERLOAD_CLIENTS clients, far past what the model can run)."""
    models = list(sources)
    servers = [
        http.naive_server(models, workers),
        http.dlserve_server(
            "dlserve-unbatched", models, DLSERVE_BATCHING="false", DLSERVE_WORKERS=str(workers)
        ),
        http.dlserve_server("dlserve", models, DLSERVE_WORKERS=str(workers)),
    ]
    peers = [
        http.lean_server(models, workers),
        http.ceiling_server(models, workers),
        http.bentoml_batchable_server(models, workers),
        http.litserve_server(models, workers),
    ]
    peers = [p for p in peers if any(p.can_serve(m) for m in models)]
    cells = plan(
        {m: w for m, (w, _) in sources.items()}, hold_s=hold_s, short_s=short_s, rounds=rounds
    )
    heavy = next((m for m, (w, _) in sources.items() if w.overload and w.multi_item), None)

    def main_runs() -> dict[str, Any]:
        out = {"runs": run_cells(servers, cells, sources, peers)}
        if heavy:
            overload = Cell(heavy, 32, OVERLOAD_CLIENTS, short_s)
            out["overload"] = run_cells(servers[2:], [overload], sources)
        return out

    results = with_servers(servers + peers, main_runs)
    if workers != 1:
        first = models[0]
        one = [
            http.naive_server(models, 1),
            http.dlserve_server("dlserve", models, DLSERVE_WORKERS="1"),
        ]
        cell = Cell(first, 1, max(CLIENTS), short_s)
        rows = with_servers(one, lambda: run_cells(one, [cell], sources))
        same = [
            r
            for r in results["runs"]
            if r["model"] == first
            and r["items"] == 1
            and r["clients"] == max(CLIENTS)
            and r["server"] != "dlserve-unbatched"
        ]
        results["worker_runs"] = [{**r, "workers": 1} for r in rows] + [
            {**r, "workers": workers} for r in same
        ]
    return {
        "load_generator": http.wrk_version(),
        "workers": workers,
        "rounds": rounds,
        "p50_targets_ms": {m: w.p50_target_ms for m, (w, _) in sources.items()},
        "lean_targets": {m: w.lean_target for m, (w, _) in sources.items()},
        "idle_cpu": {s.name: s.idle_cpu for s in servers + peers},
        **results,
    }


def run_section(ctx: BenchContext) -> dict[str, Any]:
    return run(
        ctx.sources,
        workers=ctx.settings.workers,
        hold_s=ctx.hold_s,
        short_s=ctx.short_s,
        rounds=ctx.rounds,
    )


SECTION = Section("http", run_section, report.render_http)
