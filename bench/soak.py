"""`dlserve bench --soak MINUTES`: a long run of mixed traffic with bursts of large requests,
each server process's memory sampled every few seconds.

Every route of every served model (the JSON routes, the image route, the Open Inference
Protocol), valid and invalid requests mixed (each workload's `mixed`), from 64 clients
for MINUTES one-minute slices against one dlserve server with its defaults. Once a slice,
alongside that traffic, a burst: BURST_CLIENTS clients at once send each model's large
request (its workload's `burst`: for sentiment, 256 long reviews), the request that took a
worker from ~285 to ~1,050 MiB. After each slice: the slice's throughput, p99 and answers
by status class, and the server's memory and open file descriptors over all its processes.

Summed over the processes, memory hides what matters: a worker that grows while another
is replaced with a fresh one looks flat. So a thread also samples each process's resident
memory every SAMPLE_S seconds, by role (the supervisor, `bentoml serve` itself, which runs
circus's arbiter; its workers by their circus worker id), and the report fits a line to
each process's memory after a warm-up (allocators and caches settle, the first burst
sets each worker's high-water mark): the target is under SLOPE_TARGET % of that process's
memory per hour, for every process, with no 5xx. Not a CI test: CI runs a one-minute soak
(tests/test_soak.py) that checks the same things on a short scale, the slope excepted.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench import http, report
from bench.sections import BenchContext, Section
from bench.workloads import Mixed

log = logging.getLogger("dlserve.bench")
CLIENTS = 64
WARM_UP_SLICES = 1  # memory grows while caches and allocators settle; compared from here
ITEMS_PER_MODEL = 64
SLICE_S = 60.0
SAMPLE_S = 10.0  # each process's RSS: fine enough for a line over minutes, cheap to take
# Before the per-process fit: 5 minutes, or the first third of a run under 10 minutes (so
# that a short run still has most of its samples to fit).
WARM_UP_S = 300.0
SHORT_RUN_S = 600.0
# Each burst: this many clients at once, each sending a model's large request. 16 of
# sentiment's 256 long texts keep each worker's queue (DLSERVE_MAX_QUEUE_ITEMS 4,096) and
# the mixed traffic's wait behind them (wrk's 10 s timeout) within bounds on 2 cores.
BURST_CLIENTS = 16
BURST_ITEMS = 256  # or DLSERVE_MAX_ITEMS, if lower
BURST_AT = 1 / 3  # how far into its slice a burst starts: within wrk's measured window
SLOPE_TARGET = 1.0  # % of a process's RSS at the start of the fit, per hour
MIN_FIT_SAMPLES = 3
PLOT = Path("docs/soak-rss.png")  # relative to the output folder, beside BENCHMARKS.md


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


def settled_sample(server: http.Server, within_s: float = 3.0) -> dict[str, float]:
    """`sample` once the server has closed the connections of the wrk run that just ended:
    read at once, a slice's count can hold all 64 of them (a CI run read exactly +64), which
    looks like a leak and is not one."""
    last = sample(server)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = sample(server)
        if now["fds"] == last["fds"]:
            return now
        last = now
    log.info("bench: soak: the server's descriptors still changed %.0f s after wrk ended", within_s)
    return last


@dataclass
class Series:
    """One process's resident memory over the run: (seconds since the start, MiB)."""

    role: str  # "supervisor", "worker", or "other" (anything else the server spawned)
    pid: int
    samples: list[tuple[float, float]] = field(default_factory=list)


def worker_id(proc: psutil.Process) -> str | None:
    """The circus worker id BentoML passes each worker (`--worker-id N`), if any."""
    cmd = proc.cmdline()
    at = cmd.index("--worker-id") if "--worker-id" in cmd else -1
    return cmd[at + 1] if 0 <= at < len(cmd) - 1 else None


class ProcessTracker:
    """Names the server's processes by role across samples, each series by its process.

    A worker is named by its circus worker id (`worker-1`, `worker-2`), which circus hands
    on to the process that replaces a dead one; without one, by creation time (the lowest
    slot whose process has gone). A replacement is a new series, `worker-1 (restart 1)`,
    and counts as a restart: its memory starts over, which a fit across both would hide.
    """

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.series: dict[str, Series] = {}
        self.restarts = 0
        self._names: dict[int, str] = {}  # pid → its series
        self._slots: dict[str, int] = {}  # worker slot → the pid in it now
        self._generations: Counter[str] = Counter()  # worker slot → processes it has had

    def record(self, t: float, procs: list[psutil.Process]) -> None:
        """One sample of every process in `procs` (the root first) at `t` seconds."""
        live = {p.pid for p in procs}
        new = sorted((p for p in procs if p.pid not in self._names), key=_created)
        for proc in new:
            try:
                self._name(proc, live)
            except psutil.Error:  # gone before it could be named: it was never sampled
                continue
        for proc in procs:
            name = self._names.get(proc.pid)
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            if name is not None:
                self.series[name].samples.append((round(t, 1), round(rss / 2**20, 1)))

    def _name(self, proc: psutil.Process, live: set[int]) -> None:
        if proc.pid == self.root_pid:
            name, role = "supervisor", "supervisor"
        elif proc.ppid() == self.root_pid:
            name, role = self._worker_name(proc, live), "worker"
        else:  # a helper a worker spawned: watched too, a leak may live there
            name, role = f"{proc.name()}-{proc.pid}", "other"
        self._names[proc.pid] = name
        self.series[name] = Series(role, proc.pid)

    def _worker_name(self, proc: psutil.Process, live: set[int]) -> str:
        wid = worker_id(proc)
        if wid is None:
            free = (
                s
                for s, pid in sorted(self._slots.items(), key=lambda x: _slot_number(x[0]))
                if pid not in live
            )
            slot = next(free, f"worker-{len(self._slots) + 1}")
        else:
            slot = f"worker-{wid}"
        self._slots[slot] = proc.pid
        self._generations[slot] += 1
        restarts = self._generations[slot] - 1
        if restarts:
            self.restarts += 1
            log.warning("bench: soak: %s was replaced (pid %d)", slot, proc.pid)
            return f"{slot} (restart {restarts})"
        return slot


def _created(proc: psutil.Process) -> float:
    try:
        return proc.create_time()
    except psutil.Error:
        return math.inf


def _slot_number(slot: str) -> int:
    tail = slot.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class Sampler:
    """Samples every process of a server every `every_s` seconds on a thread of its own,
    from start() to stop(), on one clock (`now()`) that the bursts are timed by too."""

    def __init__(self, server: http.Server, every_s: float) -> None:
        assert server.process is not None
        self.server = server
        self.every_s = every_s
        self.tracker = ProcessTracker(server.process.pid)
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)

    def now(self) -> float:
        return time.monotonic() - self._t0

    def take(self) -> None:
        self.tracker.record(self.now(), self.server.processes())

    def start(self) -> None:
        self.take()
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling, with a last sample at the very end; once started, at most once."""
        if self._stop.is_set() or not self._thread.is_alive():
            return
        self._stop.set()
        self._thread.join()
        self.take()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.take()
            except psutil.Error as exc:  # the server going down: the soak's end will say so
                log.warning("bench: soak: sampling failed: %s", exc)


def warm_up(duration_s: float) -> float:
    """Seconds left out of the per-process fit."""
    return duration_s / 3 if duration_s < SHORT_RUN_S else WARM_UP_S


def fit(samples: list[tuple[float, float]], from_s: float) -> dict[str, Any] | None:
    """A least-squares line through the samples from `from_s` on: its slope in MiB per hour
    and as % per hour of the line's value where the fit starts (steadier than one sample);
    None with fewer than MIN_FIT_SAMPLES samples."""
    kept = [(t, mib) for t, mib in samples if t >= from_s]
    if len(kept) < MIN_FIT_SAMPLES or kept[-1][0] == kept[0][0]:
        return None
    t, mib = np.array(kept).T
    slope, intercept = np.polyfit(t, mib, 1)  # MiB/s
    start = slope * t[0] + intercept
    return {
        "from_s": float(t[0]),
        "samples": len(kept),
        "start_mib": round(float(start), 1),
        "mib_per_hour": round(float(slope * 3600), 2),
        "pct_per_hour": round(float(slope * 3600 / start * 100), 3),
    }


def summarise_burst(
    answers: list[dict[str, Any]], *, t: float, slice_: int, path: str, items: int
) -> dict[str, Any]:
    """One burst's answers by kind: a 503 with Retry-After is the service shedding load as
    it should; any other 5xx, or no answer at all, is a failure."""
    kinds = Counter(_kind(a) for a in answers)
    return {
        "slice": slice_,
        "t": round(t, 1),
        "path": path,
        "items": items,
        "clients": len(answers),
        "status_2xx": kinds["2xx"],
        "status_503": kinds["503"],
        "status_4xx": kinds["4xx"],
        "status_5xx": kinds["5xx"],
        "no_answer": kinds["none"],
        "max_s": max(a["seconds"] for a in answers),
    }


def _kind(answer: dict[str, Any]) -> str:
    status = answer["status"]
    if status == 503 and answer["retry_after"]:
        return "503"
    return "none" if status == 0 else f"{status // 100}xx"


def send_bursts(
    url: str,
    bursts: list[Mixed],
    *,
    clients: int,
    items: int,
    delay_s: float,
    clock: Callable[[], float],
    slice_: int,
) -> list[dict[str, Any]]:
    """After `delay_s`, each model's burst in turn: `clients` of its large request at once."""
    time.sleep(delay_s)
    out = []
    for request in bursts:
        at = clock()
        answers = http.send_at_once(url, request, clients=clients)
        out.append(summarise_burst(answers, t=at, slice_=slice_, path=request[0], items=items))
        log.info("bench: soak burst: %s", out[-1])
    return out


def burst_requests(ctx: BenchContext, items: int) -> list[Mixed]:
    """Each served model's large request of `items` items, if its workload has one."""
    out = [
        workload.burst(source, items)
        for workload, source in ctx.sources.values()
        if workload.burst is not None
    ]
    for path, _, body in out:
        if len(body) > ctx.settings.max_body_bytes:  # a 413 would measure nothing
            raise ValueError(
                f"the soak's burst to {path} is {len(body):,} bytes, over "
                f"DLSERVE_MAX_BODY_BYTES ({ctx.settings.max_body_bytes:,})"
            )
    return out


def soak(
    ctx: BenchContext,
    minutes: float,
    slice_s: float = SLICE_S,
    *,
    sample_s: float = SAMPLE_S,
    burst_clients: int = BURST_CLIENTS,
) -> dict[str, Any]:
    requests = [
        r
        for workload, source in ctx.sources.values()
        if workload.mixed is not None
        for r in workload.mixed(source, ITEMS_PER_MODEL)
    ]
    items = min(BURST_ITEMS, ctx.settings.max_items)
    bursts = burst_requests(ctx, items)
    server = http.dlserve_server(
        "dlserve", list(ctx.sources), DLSERVE_WORKERS=str(ctx.settings.workers)
    )
    slices: list[dict[str, Any]] = []
    burst_log: list[dict[str, Any]] = []
    server.start()
    sampler = Sampler(server, sample_s)
    try:
        started = sample(server)
        sampler.start()
        with ThreadPoolExecutor(1, thread_name_prefix="soak-burst") as pool:
            for i in range(max(1, round(minutes * 60 / slice_s))):
                # The burst runs on its own thread while wrk holds the mixed traffic, so
                # that the slice measures the mixed traffic's answers during the burst.
                sent: Future[list[dict[str, Any]]] | None = None
                if bursts:
                    sent = pool.submit(
                        send_bursts,
                        server.url,
                        bursts,
                        clients=burst_clients,
                        items=items,
                        delay_s=slice_s * BURST_AT,
                        clock=sampler.now,
                        slice_=i + 1,
                    )
                result = http.run_wrk_mixed(
                    server.url, requests, clients=CLIENTS, duration_s=slice_s
                )
                burst_log += sent.result() if sent is not None else []
                slices.append({"slice": i + 1, **result, **settled_sample(server)})
                log.info("bench: soak slice %d: %s", i + 1, slices[-1])
    finally:
        sampler.stop()
        server.stop()
    r = summarise(ctx, minutes, slice_s, requests, started, slices, burst_log, sampler)
    if ctx.out is not None:
        plot(r, ctx.out / PLOT)
        r["plot"] = PLOT.as_posix()
    return r


def summarise(
    ctx: BenchContext,
    minutes: float,
    slice_s: float,
    requests: list[Mixed],
    started: dict[str, float],
    slices: list[dict[str, Any]],
    bursts: list[dict[str, Any]],
    sampler: Sampler,
) -> dict[str, Any]:
    """The soak's results: the slices' totals, the bursts', and each process's fit."""
    base = slices[min(WARM_UP_SLICES, len(slices) - 1)]
    last = slices[-1]
    from_s = warm_up(minutes * 60)
    processes = {
        name: {"role": s.role, "pid": s.pid, "samples": s.samples, "fit": fit(s.samples, from_s)}
        for name, s in sampler.tracker.series.items()
    }
    burst_totals = {
        k: sum(b[k] for b in bursts)
        for k in ("status_2xx", "status_503", "status_4xx", "status_5xx", "no_answer")
    }
    # A helper process that came and went has too few samples to fit; the supervisor and
    # the workers must have a slope.
    fits = [p["fit"] for p in processes.values() if p["fit"] is not None or p["role"] != "other"]
    failures = sum(s["status_5xx"] for s in slices) + burst_totals["status_5xx"]
    passed = (
        all(f is not None and f["pct_per_hour"] < SLOPE_TARGET for f in fits)
        and failures == 0
        and burst_totals["no_answer"] == 0
        and sampler.tracker.restarts == 0
    )
    return {
        "minutes": minutes,
        "slice_s": slice_s,
        "clients": CLIENTS,
        "workers": ctx.settings.workers,
        "distinct_requests": len(requests),
        "at_start": started,
        "slices": slices,
        "rss_growth": round(last["rss_mib"] / base["rss_mib"] - 1, 4),
        "fd_growth": last["fds"] - base["fds"],
        "status_5xx": sum(s["status_5xx"] for s in slices),
        "socket_errors": sum(s["socket_errors"] for s in slices),
        "sample_s": sampler.every_s,
        "warm_up_s": round(from_s, 1),
        "processes": processes,
        "restarts": sampler.tracker.restarts,
        "bursts": bursts,
        "burst_totals": burst_totals,
        "burst_at_s": round(slice_s * BURST_AT, 1),
        "slope_target_pct_per_hour": SLOPE_TARGET,
        "failures_5xx": failures,
        "passed": passed,
    }


def plot(r: dict[str, Any], path: Path) -> None:
    """Each process's RSS over the run, the warm-up shaded and the bursts marked, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # only the soak draws
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.axvspan(0, r["warm_up_s"] / 60, color="0.9", label="warm-up (not fitted)")
    for i, b in enumerate(r["bursts"]):
        ax.axvline(
            b["t"] / 60,
            color="0.55",
            linestyle=":",
            linewidth=0.8,
            alpha=0.7,
            label="burst" if i == 0 else None,
        )
    for name, p in r["processes"].items():
        t, mib = zip(*p["samples"], strict=True) if p["samples"] else ((), ())
        ax.plot([x / 60 for x in t], mib, label=name, linewidth=1.4)
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(
        f"dlserve soak: resident memory per process ({r['minutes']:g} min, {r['workers']} workers)"
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def run(ctx: BenchContext) -> dict[str, Any]:
    return soak(ctx, ctx.soak_minutes)


def render(r: dict[str, Any], _: dict[str, Any]) -> list[str]:
    rows = [
        [
            s["slice"],
            f"{s['requests_per_s']:,.0f}",
            s["p99"],
            s["status_2xx"],
            s["status_4xx"],
            s["status_5xx"],
            s["socket_errors"],
            _burst_cell(r, s["slice"]),
            s["rss_mib"],
            s["fds"],
        ]
        for s in r["slices"]
    ]
    p99 = statistics.median(s["p99"] for s in r["slices"])
    return [
        (
            "## Soak: mixed traffic and bursts, memory per process"
            if "processes" in r
            else "## Soak: mixed traffic, sampled every minute"
        ),  # results from before both
        "",
        f"{r['minutes']:g} minute{'' if r['minutes'] == 1 else 's'} of every route of every "
        f"model, valid and invalid requests mixed ({r['distinct_requests']} distinct "
        f"requests, replayed by wrk), {r['clients']} clients, {r['workers']} workers, one "
        "dlserve server with its defaults "
        f"(`dlserve bench --soak {r['minutes']:g}`). {_burst_note(r)}After each "
        f"{r['slice_s']:g} s slice: throughput, p99, answers by status class (the 4xx are the "
        "invalid requests), and the server's resident memory and open file descriptors over "
        f"all its processes. At start: {r['at_start']['rss_mib']} MiB, "
        f"{r['at_start']['fds']} descriptors.",
        "",
        report.table(
            [
                "slice",
                "requests/s",
                "p99 ms",
                "2xx",
                "4xx",
                "5xx",
                "socket errors",
                "burst 2xx / 503 / other",
                "RSS MiB",
                "open fds",
            ],
            rows,
        ),
        "",
        f"Memory over all processes from slice {WARM_UP_SLICES + 1} to the last: "
        f"{r['rss_growth']:+.1%}; descriptors: {r['fd_growth']:+d}; 5xx: {r['status_5xx']}; "
        f"median p99 {p99} ms.",
        "",
        *render_processes(r),
    ]


def _burst_cell(r: dict[str, Any], slice_: int) -> str:
    """A slice's burst answers: 2xx / 503 with Retry-After / anything else."""
    mine = [b for b in r.get("bursts", []) if b["slice"] == slice_]
    if not mine:
        return "–"
    ok, shed = sum(b["status_2xx"] for b in mine), sum(b["status_503"] for b in mine)
    return f"{ok} / {shed} / {sum(b['clients'] for b in mine) - ok - shed}"


def _burst_note(r: dict[str, Any]) -> str:
    if not r.get("bursts"):
        return ""
    b = r["bursts"][0]
    return (
        f"Once a slice, {r['burst_at_s']:g} s in, a burst: {b['clients']} clients at "
        f"once each send a request of {b['items']} large items (`{b['path']}`: long "
        "reviews): large requests set each worker's memory high-water mark. "
    )


def render_processes(r: dict[str, Any]) -> list[str]:
    """The per-process part: each process's memory and its fitted slope, the verdict, the
    plot. Results from before per-process sampling have none of it."""
    if "processes" not in r:
        return []
    target = r["slope_target_pct_per_hour"]
    rows = []
    for name, p in r["processes"].items():
        mibs = [mib for _, mib in p["samples"]] or [0.0]
        f = p["fit"]
        rows.append(
            [
                name,
                p["role"],
                mibs[0],
                max(mibs),
                mibs[-1],
                f["start_mib"] if f else "–",
                f"{f['mib_per_hour']:+.1f}" if f else "–",
                f"{f['pct_per_hour']:+.2f} %" if f else "–",
            ]
        )
    totals = r["burst_totals"]
    return [
        f"Each process's resident memory, sampled every {r['sample_s']:g} s by role: the "
        "supervisor (`bentoml serve`, circus's arbiter) and each worker by its circus worker "
        "id (a replaced worker is a new series, and a restart). A least-squares line through "
        f"each process's samples after a {_span(r['warm_up_s'])} warm-up gives its "
        "growth per hour, as a share of the line's value at the start of the fit.",
        "",
        report.table(
            [
                "process",
                "role",
                "RSS at start MiB",
                "peak MiB",
                "last MiB",
                "fit start MiB",
                "slope MiB/h",
                "slope % of RSS/h",
            ],
            rows,
        ),
        "",
        f"Bursts: {len(r['bursts'])} sent, {sum(b['clients'] for b in r['bursts'])} requests: "
        f"{totals['status_2xx']} answered 2xx, {totals['status_503']} refused 503 with "
        f"Retry-After (load shed, as designed), {totals['status_4xx']} 4xx, "
        f"{totals['status_5xx']} other 5xx, {totals['no_answer']} unanswered. "
        f"Worker restarts: {r['restarts']}.",
        "",
        verdict(r, target),
        "",
        *(
            [f"![Resident memory per process over the soak]({r['plot']})", ""]
            if r.get("plot")
            else []
        ),
    ]


def _span(seconds: float) -> str:
    return f"{seconds / 60:g}-minute" if seconds >= 60 else f"{seconds:g} s"


def verdict(r: dict[str, Any], target: float) -> str:
    """The target, every process under `target` % per hour and no 5xx, and how it went."""
    fitted = {n: p["fit"] for n, p in r["processes"].items() if p["fit"] is not None}
    unfitted = [n for n, p in r["processes"].items() if p["fit"] is None]
    worst = max(fitted, key=lambda n: fitted[n]["pct_per_hour"], default=None)
    over = [n for n, f in fitted.items() if f["pct_per_hour"] >= target]
    parts = [
        f"largest slope {worst} {fitted[worst]['pct_per_hour']:+.2f} %/h"
        if worst
        else "no process had enough samples to fit"
    ]
    if over:
        parts.append(f"at or over the target: {', '.join(over)}")
    if unfitted:
        parts.append(f"too few samples after the warm-up to fit: {', '.join(unfitted)}")
    parts.append(
        f"5xx: {r['failures_5xx']} (wrk {r['status_5xx']}, bursts "
        f"{r['burst_totals']['status_5xx']}), unanswered burst requests "
        f"{r['burst_totals']['no_answer']}, worker restarts {r['restarts']}"
    )
    word = "met" if r["passed"] else "NOT met"
    return (
        f"**Target: every process < {target:g} % of its RSS per hour after the warm-up, "
        f"0 5xx: {word}** ({'; '.join(parts)})."
    )


SECTION = Section("soak", run, render)
