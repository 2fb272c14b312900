"""The machine a benchmark ran on, and BENCHMARKS.md rendered from the JSON results."""

from __future__ import annotations

import os
import platform
import statistics
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from dlserve.settings import Settings

KEEPALIVE_DEFAULT = Settings.model_fields["keepalive_requests"].default
FRAMEWORKS = ("bentoml-batchable", "litserve")  # the serving frameworks among the peers
PEER_NOTES = {
    "naive": "FastAPI + pydantic, one model run per request (`bench/peers/naive.py`)",
    "lean": "Starlette + orjson, one model run per request, hand-written (`bench/peers/lean.py`)",
    "ceiling": "Starlette + orjson, parses the JSON and runs no model: the HTTP ceiling "
    "(`bench/peers/ceiling.py`)",
    "bentoml-batchable": "BentoML's own `batchable=True` API, its defaults "
    "(`bench/peers/bentoml_batchable.py`; no recommender: its requests "
    "have no batch axis)",
    "litserve": "LitServe with its batching, max_batch_size 64, batch_timeout 10 ms, "
    "fast_queue (`bench/peers/litserve_peer.py`)",
    "dlserve-unbatched": "the service with `DLSERVE_BATCHING=false`",
    "dlserve": "the service with its defaults",
}


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    mem_kb = next(
        (
            int(line.split()[1])
            for line in _read("/proc/meminfo").splitlines()
            if line.startswith("MemTotal:")
        ),
        0,
    )
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kb / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": version("onnxruntime-gpu"),
        "bentoml": version("bentoml"),
        "gpu": "none",
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render(sections: dict[str, dict[str, Any]], order: list[Any]) -> str:
    """BENCHMARKS.md: a header, then each section that has results, in `order`."""
    out = [
        "# Benchmarks",
        "",
        "Written by `dlserve bench` (do not edit by hand); the raw numbers are in "
        "`benchmarks.json`. Each section was measured side by side in one run on the machine "
        "it names: in-process figures are medians over repeats; over HTTP the servers take "
        "turns cell by cell, and the cells the targets are judged on run several rounds per "
        "server, of which the tables give the median.",
        "",
    ]
    for section in order:
        if (results := sections.get(section.name)) is not None:
            out += section.render(results, sections)
            out += [
                f"*Measured {results['machine']['date']} on {describe(results['machine'])}.*",
                "",
            ]
    return "\n".join(out)


def describe(m: dict[str, Any]) -> str:
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, GPU: {m['gpu']}; "
        f"{m['os']}; Python {m['python']}, onnxruntime {m['onnxruntime']}, "
        f"bentoml {m['bentoml']}"
    )


def render_inprocess(r: dict[str, Any], _: dict[str, Any]) -> list[str]:
    out = [
        "## In-process ceiling (ONNX Runtime alone, no HTTP)",
        "",
        "The model's runner (preprocessed input in, probabilities out) on one ONNX Runtime "
        "thread, over the same 256 held-out items at every batch size (MNIST test images; "
        "SST-2 dev sentences, about 20 tokens on average; MovieLens u1.base users, 85 ratings "
        "on average, each item one user's 1,682 expected ratings); items per second.",
        "",
    ]
    for c in r["ceiling"]:
        out += [
            f"**{c['model']}** ({c['provider']}): batch 1 {c['batch_1_items_per_s']:,} "
            f"items/s; best {c['best']['items_per_s']:,} items/s at batch "
            f"{c['best']['batch']}.",
            "",
            table(
                ["batch", "ms per batch", "items/s"],
                [[r["batch"], r["ms_per_batch"], f"{r['items_per_s']:,}"] for r in c["by_batch"]],
            ),
            "",
        ]
    if b := r.get("bucketing"):
        out += [
            "## Length bucketing (sentiment)",
            "",
            f"A batch of {b['batch']} texts: SST-2 dev sentences plus {b['long_texts']} long "
            "reviews (~200 tokens). Padding every text to the longest means "
            f"{b['tokens_padded']:,} LSTM token-steps for {b['tokens_real']:,} real tokens; "
            "the runner instead sorts texts by length and runs each length bucket on its own "
            "(`dlserve/runners/sentiment.py`).",
            "",
            table(
                ["batch", "padded to longest (ms)", "length buckets (ms)", "speed-up"],
                [[b["batch"], b["ms_padded"], b["ms_bucketed"], f"{b['speedup']}×"]],
            ),
            "",
        ]
    return out


def ms(x: float) -> str:
    """A latency in ms, to a sensible precision."""
    return f"{x:,.1f}" if x >= 10 else f"{x:.2f}"


def _cell(r: dict[str, Any]) -> tuple[str, int, int, str]:
    return r["model"], r["items"], r["clients"], r["encoding"]


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell and server, in the order they first ran: the median of its rounds'
    throughput, latency percentiles and mean batch; requests and errors summed. The row's
    `round_runs` holds the rounds themselves (its `rounds` stays the cell's planned count)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((*_cell(r), r["server"]), []).append(r)
    out = []
    for group in groups.values():
        batches = [r["mean_batch"] for r in group if r["mean_batch"] is not None]
        out.append(
            {
                **group[0],
                **{
                    k: statistics.median(r[k] for r in group)
                    for k in ("requests_per_s", "items_per_s", "p50", "p95", "p99")
                },
                **{k: sum(r[k] for r in group) for k in ("requests", "non_2xx", "socket_errors")},
                "mean_batch": round(statistics.median(batches), 2) if batches else None,
                "round_runs": group,
            }
        )
    return out


def _run_rows(cells: list[dict[str, Any]], naive: dict[tuple, float]) -> list[list[Any]]:
    rows = []
    for r in cells:
        ratio = r["requests_per_s"] / naive[_cell(r)] if naive.get(_cell(r)) else None
        rows.append(
            [
                r["model"],
                f"{r['items']}" + (" (base64)" if r["encoding"] == "base64" else ""),
                r["clients"],
                r["server"],
                len(r["round_runs"]),
                f"{r['requests_per_s']:,.0f}",
                f"{r['items_per_s']:,.0f}",
                ms(r["p50"]),
                ms(r["p95"]),
                ms(r["p99"]),
                r["non_2xx"] + r["socket_errors"],
                r["mean_batch"] if r["mean_batch"] is not None else "—",
                f"{ratio:.2f}×" if ratio is not None and r["server"] != "naive" else "",
            ]
        )
    return rows


def _round_cell(run: dict[str, Any]) -> str:
    """One round's throughput, its connections per worker, and those not accepted yet."""
    split = "/".join(map(str, run.get("connections", [])))
    waiting = f" +{run['unaccepted']} queued" if run.get("unaccepted") else ""
    return f"{run['requests_per_s']:,.0f} ({split}{waiting})"


def _round_rows(cells: list[dict[str, Any]]) -> list[list[Any]]:
    """Each round of the cells that ran more than one: throughput and connection split."""
    rows = []
    for r in cells:
        if len(r["round_runs"]) > 1:
            rows.append(
                [
                    r["model"],
                    r["clients"],
                    r["server"],
                    *(_round_cell(x) for x in r["round_runs"]),
                    f"{r['requests_per_s']:,.0f}",
                ]
            )
    return rows


def _one_sided(cells: list[dict[str, Any]], workers: int) -> dict[str, str]:
    """Per server: in how many multi-round runs one process held every connection."""
    out: dict[str, list[int]] = {}
    for r in cells:
        if len(r["round_runs"]) > 1:
            counts = out.setdefault(r["server"], [0, 0])
            counts[0] += sum(len(x.get("connections", [])) < workers for x in r["round_runs"])
            counts[1] += len(r["round_runs"])
    return {server: f"{n} of {total}" for server, (n, total) in out.items()}


def targets(h: dict[str, Any], ceiling: list[dict[str, Any]]) -> list[list[Any]]:
    """The acceptance figures (against the naive peer, the lean peer, the frameworks, the
    in-process ceiling), each with the measurement and whether it is met."""
    cells = summarise(h["runs"])

    def find(
        model: str, items: int, clients: int, server: str, encoding: str = "json"
    ) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in cells
                if (r["model"], r["items"], r["clients"], r["server"], r["encoding"])
                == (model, items, clients, server, encoding)
            ),
            None,
        )

    out = []
    most = max(r["clients"] for r in cells)
    held = [
        r for r in cells if r["clients"] == most and r["items"] == 1 and r["server"] == "dlserve"
    ]
    failed = sum(r["non_2xx"] + r["socket_errors"] for r in held)
    out.append(
        [
            "0 non-2xx at 64 clients, single items, every model and mixed",
            f"{failed} of {sum(r['requests'] for r in held):,}",
            failed == 0,
        ]
    )
    models = list(dict.fromkeys(r["model"] for r in cells if r["model"] != "mixed"))
    for model in models:
        ours, base = find(model, 1, 64, "dlserve"), find(model, 1, 64, "naive")
        if ours and base:
            # Judged against the naive server's best round, not its median: in a round where
            # all its connections landed on one worker, it serves half as much (below).
            peak = max(base["round_runs"], key=lambda r: r["requests_per_s"])
            ratio = ours["requests_per_s"] / peak["requests_per_s"]
            out.append(
                [
                    f"{model}: ≥ 1.5× naive throughput, p99 ≤ naive's (1 item, 64 clients, "
                    f"dlserve's median of {len(ours['round_runs'])} against naive's best "
                    "round)",
                    f"{ratio:.2f}× ({ours['requests_per_s'] / base['requests_per_s']:.2f}× "
                    f"naive's median); p99 {ms(ours['p99'])} vs {ms(peak['p99'])} ms",
                    ratio >= 1.5 and ours["p99"] <= peak["p99"],
                ]
            )
    for model in models:
        ours, lean = find(model, 1, 64, "dlserve"), find(model, 1, 64, "lean")
        if ours and lean and lean["requests_per_s"] and model in h.get("lean_targets", {}):
            want, p99_factor = h["lean_targets"][model]
            ratio = ours["requests_per_s"] / lean["requests_per_s"]
            p99_ok = p99_factor is None or ours["p99"] <= p99_factor * lean["p99"]
            p99_goal = f", p99 ≤ {p99_factor:g}× its p99" if p99_factor else ""
            out.append(
                [
                    f"{model}: ≥ {want:g}× the lean hand-written peer{p99_goal} (1 item, "
                    "64 clients, medians)",
                    f"{ratio:.2f}×; p99 {ms(ours['p99'])} vs {ms(lean['p99'])} ms",
                    ratio >= want and p99_ok,
                ]
            )
        for peer in FRAMEWORKS:
            # a peer that answered nothing in a run has no ratio (it shows as 0 in its table)
            if ours and (theirs := find(model, 1, 64, peer)) and theirs["requests_per_s"]:
                ratio = ours["requests_per_s"] / theirs["requests_per_s"]
                out.append(
                    [
                        f"{model}: ≥ 2× {peer} (1 item, 64 clients, medians)",
                        f"{ratio:.2f}×",
                        ratio >= 2,
                    ]
                )
    best = {c["model"]: c["best"]["items_per_s"] for c in ceiling}
    for r in cells:
        if (
            r["items"] == 32
            and r["clients"] == 64
            and r["server"] == "dlserve"
            and r["model"] in best
        ):
            share = r["items_per_s"] / best[r["model"]]
            out.append(
                [
                    f"{r['model']}: 32-item requests ({r['encoding']}) ≥ 25 % of the "
                    "in-process ceiling",
                    f"{share:.0%} ({r['items_per_s']:,.0f} of {best[r['model']]:,} items/s)",
                    share >= 0.25,
                ]
            )
    for model, limit in h.get("p50_targets_ms", {}).items():
        if r := find(model, 1, 1, "dlserve"):
            out.append(
                [f"{model}: p50 ≤ {limit} ms at 1 client", f"{ms(r['p50'])} ms", r["p50"] <= limit]
            )
    return [[a, b, "met" if ok else "**missed**"] for a, b, ok in out]


def render_peers(cells: list[dict[str, Any]], idle: dict[str, float]) -> list[str]:
    """One table per model: every server on the cell all of them ran (one item per
    request, 64 clients), against dlserve and against the HTTP ceiling, with the cores
    each server used while idle."""
    out = ["### Against every peer, one item per request, 64 clients", ""]
    for model in dict.fromkeys(r["model"] for r in cells):
        held = [r for r in cells if r["model"] == model and r["items"] == 1 and r["clients"] == 64]
        ours = next((r for r in held if r["server"] == "dlserve"), None)
        top = next((r for r in held if r["server"] == "ceiling"), None)
        if ours is None or len(held) < 4:
            continue
        rows = [
            [
                r["server"],
                f"{r['requests_per_s']:,.0f}",
                ms(r["p50"]),
                ms(r["p99"]),
                r["non_2xx"] + r["socket_errors"],
                f"{ours['requests_per_s'] / r['requests_per_s']:.2f}×"
                if r["requests_per_s"]
                else "—",
                f"{r['requests_per_s'] / top['requests_per_s']:.0%}" if top else "—",
                f"{idle[r['server']]:.2f}" if r["server"] in idle else "—",
            ]
            for r in sorted(held, key=lambda r: -r["requests_per_s"])
        ]
        out += [
            f"**{model}**",
            "",
            table(
                [
                    "server",
                    "requests/s",
                    "p50 ms",
                    "p99 ms",
                    "non-2xx",
                    "dlserve ÷ server",
                    "share of the ceiling",
                    "idle cores",
                ],
                rows,
            ),
            "",
        ]
    return out


def render_http(h: dict[str, Any], sections: dict[str, Any]) -> list[str]:
    ceiling = sections.get("inprocess", {}).get("ceiling", [])
    cells = summarise(h["runs"])
    naive = {_cell(r): r["requests_per_s"] for r in cells if r["server"] == "naive"}
    return [
        *_http_method(h),
        "### Targets",
        "",
        "Against the naive server, throughput is judged as dlserve's median round against "
        "its best round (its median beside it): in a round where every connection lands on "
        'one worker of a server, that server serves about half as much ("Round by round" '
        "below), and such a round of the naive server must not flatter dlserve. Against the "
        "other peers, medians against medians.",
        "",
        table(["target", "measured", ""], targets(h, ceiling)),
        "",
        *render_peers(cells, h.get("idle_cpu", {})),
        "### Every cell",
        "",
        "Where a cell ran more than one round, each figure is the median over its rounds "
        "(non-2xx: the sum).",
        "",
        table(HTTP_HEADER, _run_rows(cells, naive)),
        "",
        *_http_rounds(cells, h["workers"]),
        *_http_workers(h.get("worker_runs") or []),
        *_http_overload(h.get("overload") or []),
        "### Where the time goes",
        "",
        "Not in the model, for digits: the HTTP tier. What one worker spends its time on "
        'is measured by the profile section ("Where a worker\'s time goes", '
        "`dlserve bench --only profile`). Sentiment is different: its LSTM costs "
        "0.55-0.85 ms of CPU per text at any batch size (the in-process table above), so "
        "under load the two workers' inference threads and their event loops share the "
        "same two cores, and batching saves little.",
        "",
    ]


HTTP_HEADER = [
    "model",
    "items/request",
    "clients",
    "server",
    "runs",
    "requests/s",
    "items/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "non-2xx",
    "mean batch",
    "vs naive",
]


def _http_method(h: dict[str, Any]) -> list[str]:
    """How the HTTP cells are measured: load generator, servers, payloads."""
    return [
        "## Over HTTP: dlserve against the servers people pick",
        "",
        f"Load generator: {h['load_generator']}, one thread, one keep-alive connection per "
        "client; each client sends its next request as soon as the last is answered "
        "(`bench/wrk_requests.lua` replays 256 prepared requests per payload). "
        "Latency percentiles are wrk's, over every request of the run. wrk shares the "
        "machine's cores with the server under test, alike for every server.",
        "",
        f"Servers, each with {h['workers']} worker process(es) and the same models, runners "
        "and ONNX Runtime settings (`bench/peers/`): "
        + "; ".join(f"**{name}**, {note}" for name, note in PEER_NOTES.items())
        + ". "
        "They take turns cell by cell, in rotating order; the peers other than naive run the "
        "cells the targets are judged on (one item per request, 64 clients). Every server is "
        "started once, and whichever is not under load is paused (SIGSTOP, once it has "
        'finished what wrk left behind): some servers spin while idle ("idle cores" below: '
        "the cores each used while ready and unloaded), and would otherwise slow the one "
        "being measured. Ray Serve is left out: on 2 cores its HTTP proxy, controller and "
        "replicas would share the two cores with the server's own work and with wrk, so it "
        "would measure the machine more than Ray Serve. Payloads: MNIST "
        "test images as JSON arrays of 0-255 integers (or `images_base64`), SST-2 dev "
        "sentences, one u1.base user's ratings per recommend request (85 on average, "
        'k = 10). "mean batch" is items per model run, read from `/metrics` '
        "(`dlserve_batch_items`).",
        "",
    ]


def _http_rounds(cells: list[dict[str, Any]], workers: int) -> list[str]:
    """Each round of the cells that ran more than one, and how connections were split."""
    rounds = _round_rows(cells)
    if not rounds:
        return []
    most = max(len(r["round_runs"]) for r in cells)
    one_sided = "; ".join(f"{server} {n}" for server, n in _one_sided(cells, workers).items())
    return [
        "### Round by round, and connection balance",
        "",
        "Requests/s of each round of the cells above that ran more than once, with "
        "how many of the clients' connections each server process held half-way "
        'through (the fullest of three psutil reads around then; "+N queued": connections '
        "waiting in the listening socket's queue for a worker to accept them). The workers "
        "of both "
        "servers share one listening socket, and whichever calls accept() first takes "
        "a new connection: a burst of new connections can all land on one worker, "
        "which then does all the work while the other idles for as long as the clients keep their "
        "connections, at about half the throughput. dlserve closes one keep-alive "
        f"connection in `DLSERVE_KEEPALIVE_REQUESTS` ({KEEPALIVE_DEFAULT}) "
        "responses at random "
        "(`Connection: close`; `service/guard.py`), so that a client reconnects "
        "and the split evens out within seconds; the naive server keeps uvicorn's "
        f"behaviour. Runs in which one process held every connection: {one_sided}.",
        "",
        table(
            ["model", "clients", "server", *(f"round {i + 1}" for i in range(most)), "median"],
            rounds,
        ),
        "",
    ]


def _http_workers(rows: list[dict[str, Any]]) -> list[str]:
    """Digits at 64 clients with the default workers against one, for both servers."""
    if not rows:
        return []
    return [
        "### Worker processes",
        "",
        "Digits, one image per request, 64 clients: the default (one worker per core) "
        "against one worker, for both servers.",
        "",
        table(
            ["workers", "server", "requests/s", "p50 ms", "p99 ms", "non-2xx"],
            [
                [
                    r["workers"],
                    r["server"],
                    f"{r['requests_per_s']:,.0f}",
                    ms(r["p50"]),
                    ms(r["p99"]),
                    r["non_2xx"] + r["socket_errors"],
                ]
                for r in rows
            ],
        ),
        "",
    ]


def _http_overload(rows: list[dict[str, Any]]) -> list[str]:
    """Sentiment beyond the queue's capacity: what is refused, and how long the rest wait."""
    if not rows:
        return []
    return [
        "### Beyond capacity",
        "",
        "Sentiment, 32 texts per request from 512 clients: 16,384 texts in flight, "
        "several seconds of model work, against each worker's queue, bounded at "
        "`DLSERVE_MAX_QUEUE_ITEMS` (4,096 items). Requests that do not fit are refused "
        "at once with 503 and `Retry-After: 1` (wrk does not wait before retrying, so "
        "it keeps knocking). Accepted requests wait at most about a full queue's "
        "worth of work (4,096 texts are several seconds of LSTM), well inside the "
        "30 s request timeout; a lower `DLSERVE_MAX_QUEUE_ITEMS` trades more 503s for "
        "a shorter wait.",
        "",
        table(HTTP_HEADER, _run_rows(summarise(rows), {})),
        "",
    ]
