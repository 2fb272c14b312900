"""`dlserve bench --only burst`: many clients send their largest request at once, then hang up.

The scenario of the issue "Weeks, not hours": on one dlserve server with 2 workers, 64
clients each send one POST /sentiment/predict of 256 long texts (SST-2 dev sentences joined
to LONG_TOKENS tokens), all within a few milliseconds, wait 0.3 s and close their sockets
without reading the answer. 0.5 s after the sends an ordinary client asks for one short
text. What is measured is what the gone clients still cost:

- the ordinary request's status and latency (target: 200 within 1 s);
- the items the server ran for clients that had already hung up (dlserve_items_predicted_total
  before and after, less the ordinary request's item; target: at most 1,024);
- the seconds from the hang-up until the server's processes go idle (target: 3 s);
- each worker's resident memory when ready, right after idle and 30 s later (target: 30 s
  later at most 1.5 × ready);
- dlserve_requests_abandoned_total by model and stage, where the server counts it.

The clients use raw sockets, so that the moment they hang up is exactly known and nothing
reads an answer. `measure(url, root_pid, texts)` runs the scenario against a server that is
already running; `python -m bench.burst` starts one from this checkout's code with the models
in the store (BENTOML_HOME) and prints the results as JSON, so that two checkouts can be
compared side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
import psutil

from bench import http, report
from bench.sections import BenchContext, Section
from bench.workloads import sentiment_long_texts
from dlserve import registry
from dlserve.settings import Settings, load_settings
from readers.sst2 import load_sst2

log = logging.getLogger("dlserve.bench")
MODEL = "sentiment"
PATH = "/sentiment/predict"
WORKERS = 2  # the server
CLIENTS = 64
ITEMS = 256  # per request: DLSERVE_MAX_ITEMS, the largest request a client may send
HANG_UP_AFTER_S = 0.3  # each client's wait between its send and its close
ORDINARY_AFTER_S = 0.5  # from the sends to the ordinary request
ORDINARY_TIMEOUT_S = 60.0
SAMPLE_S = 0.1  # CPU sampling period while waiting for idle
IDLE_WINDOW_S = 0.5
IDLE_CORES = 0.1  # above the server's own idle use: still working
IDLE_CAP_S = 60.0
SETTLE_S = 3.0  # after ready, before the baseline is read: start-up work ends
READY_WINDOW_S = 2.0  # the server's own idle CPU use is measured over this, once settled
RSS_LATER_S = 30.0
MIB = 2**20
# The "done when".
TARGET_ORDINARY_S = 1.0
TARGET_GONE_ITEMS = 1024
TARGET_IDLE_S = 3.0
TARGET_RSS_RATIO = 1.5


# --- the server's processes ---------------------------------------------------------------


def tree(root_pid: int) -> list[psutil.Process]:
    """The server's root process and every process it has spawned (none once it is gone)."""
    try:
        root = psutil.Process(root_pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def workers(root_pid: int) -> list[psutil.Process]:
    """The processes that serve requests. BentoML 1.4's `bentoml serve` keeps its process
    manager (circus) in the root and starts each worker as `python -m
    _bentoml_impl.worker.service ...`; should a BentoML version name them otherwise, every
    descendant of the root is taken."""
    procs = tree(root_pid)[1:]
    named = [p for p in procs if "worker" in " ".join(_cmdline(p))]
    return sorted(named or procs, key=lambda p: p.pid)


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:  # exited, or a zombie, between the listing and the reading
        return []


def rss_mib(pids: list[int]) -> dict[int, float | None]:
    """Resident memory (MiB) of each process; None for one that has exited (a restarted
    worker shows as its old pid's None)."""
    out: dict[int, float | None] = {}
    for pid in pids:
        try:
            out[pid] = round(psutil.Process(pid).memory_info().rss / MIB, 1)
        except psutil.Error:
            out[pid] = None
    return out


class CpuClock:
    """CPU seconds (user + system) the server's processes have used since it started, over
    every process it has had: a worker that exits keeps its last reading, so that a restart
    does not make the total run backwards, and a new one counts from its start."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.last: dict[tuple[int, float], float] = {}  # (pid, start time) → CPU seconds

    def read(self) -> float:
        for proc in tree(self.root_pid):
            try:
                t = proc.cpu_times()
                self.last[(proc.pid, proc.create_time())] = t.user + t.system
            except psutil.Error:
                continue
        return sum(self.last.values())

    def cores(self, window_s: float) -> float:
        """Cores used over the next `window_s` seconds."""
        before = self.read()
        time.sleep(window_s)
        return (self.read() - before) / window_s


def wait_idle(clock: CpuClock, since: float, threshold: float) -> float | None:
    """Seconds from `since` (a perf_counter time) to the first sample after which the
    server uses less than `threshold` cores over IDLE_WINDOW_S; None if that has not
    happened IDLE_CAP_S after `since`."""
    samples: list[tuple[float, float]] = []
    span = round(IDLE_WINDOW_S / SAMPLE_S)  # samples per window
    while True:
        now = time.perf_counter()
        samples.append((now, clock.read()))
        if len(samples) > span:
            (t0, c0), (t1, c1) = samples[-span - 1], samples[-1]
            if (c1 - c0) / (t1 - t0) < threshold:
                return round(t0 - since, 2)
            if t0 - since > IDLE_CAP_S:
                return None
        time.sleep(max(0.0, now + SAMPLE_S - time.perf_counter()))


# --- /metrics ------------------------------------------------------------------------------


def scrape(url: str) -> str:
    import httpx  # a dependency of BentoML's

    r = httpx.get(url + "/metrics", timeout=60)
    r.raise_for_status()
    return r.text


def counter(text: str, name: str, **labels: str) -> dict[tuple[str, ...], float]:
    """A counter's value by its other labels' values (summed over the series that differ only
    in labels outside those, such as the worker's), keeping the series whose labels match
    `labels`; empty when the server has no such counter."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for s in family.samples:
            if s.name != name + "_total" or any(s.labels.get(k) != v for k, v in labels.items()):
                continue
            key = tuple(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in labels)
            out[key] = out.get(key, 0.0) + s.value
    return out


def items_predicted(text: str) -> float:
    return sum(counter(text, "dlserve_items_predicted", model=MODEL).values())


def abandoned(text: str) -> dict[str, float]:
    """dlserve_requests_abandoned_total by "model=..,stage=..", where the server has it."""
    return {",".join(k): v for k, v in counter(text, "dlserve_requests_abandoned").items()}


def errors(text: str) -> dict[str, float]:
    """The sentiment model's dlserve_errors_total by "reason=..": how the burst's requests
    that did not run ended (503 queue full, 504 timed out, ...)."""
    return {",".join(k): v for k, v in counter(text, "dlserve_errors", model=MODEL).items()}


def grown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Each series' growth between two scrapes, those that grew only."""
    return {k: v - before.get(k, 0.0) for k, v in sorted(after.items()) if v > before.get(k, 0.0)}


# --- the clients ---------------------------------------------------------------------------


def request_bytes(url: str, body: bytes) -> bytes:
    host = urlsplit(url).netloc
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Client:
    """One burst client: a connection opened before the burst, so that all send at once."""

    sock: socket.socket
    sent_at: float = 0.0  # perf_counter when its whole request was written
    closed_at: float = 0.0
    error: str | None = None  # the send failed (the server closed first)

    def send_and_hang_up(self, data: bytes, start: threading.Barrier) -> None:
        start.wait()
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self.error = type(exc).__name__
        self.sent_at = time.perf_counter()
        time.sleep(HANG_UP_AFTER_S)
        self.sock.close()  # unread: the answer, if any has come, is never looked at
        self.closed_at = time.perf_counter()


def hang_up_burst(url: str, data: bytes) -> list[Client]:
    """CLIENTS connections each send `data` at the same moment and close HANG_UP_AFTER_S
    later; returns once all are closed."""
    where = urlsplit(url)
    address = (where.hostname or "127.0.0.1", where.port or 80)
    clients = [Client(socket.create_connection(address)) for _ in range(CLIENTS)]
    start = threading.Barrier(CLIENTS)
    threads = [
        threading.Thread(target=c.send_and_hang_up, args=(data, start), name=f"burst-{i}")
        for i, c in enumerate(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return clients


def ordinary(url: str, text: str) -> dict[str, Any]:
    """One ordinary request, one short text: its status (0: none came) and milliseconds."""
    import httpx

    began = time.perf_counter()
    try:
        status = httpx.post(
            url + PATH, json={"texts": [text]}, timeout=ORDINARY_TIMEOUT_S
        ).status_code
    except httpx.HTTPError as exc:
        log.warning("bench: burst: the ordinary request failed: %r", exc)
        status = 0
    return {"status": status, "ms": round((time.perf_counter() - began) * 1e3, 1)}


# --- the scenario --------------------------------------------------------------------------


def burst_body(texts: list[str], max_body_bytes: int) -> bytes:
    body = orjson.dumps({"texts": [texts[i % len(texts)] for i in range(ITEMS)]})
    if len(body) > max_body_bytes:  # a 413 would measure the wrong thing
        raise ValueError(
            f"the burst's request body is {len(body):,} bytes, over "
            f"DLSERVE_MAX_BODY_BYTES ({max_body_bytes:,})"
        )
    return body


def measure(
    url: str,
    root_pid: int,
    texts: list[str],
    short_text: str = "a fine film",
    *,
    max_body_bytes: int = 8 * MIB,
) -> dict[str, Any]:
    """The scenario against the ready dlserve server at `url` whose root process is
    `root_pid`: `texts` are the long texts the burst's requests are made of, `short_text`
    the ordinary request's."""
    data = request_bytes(url, burst_body(texts, max_body_bytes))
    clock = CpuClock(root_pid)
    time.sleep(SETTLE_S)
    idle_cores = round(clock.cores(READY_WINDOW_S), 3)
    pids = [p.pid for p in workers(root_pid)]
    ready = rss_mib(pids)
    before = scrape(url)
    log.info(
        "bench: burst: %d workers %s, RSS %s MiB, idle %.2f cores",
        len(pids),
        pids,
        ready,
        idle_cores,
    )

    result: dict[str, Any] = {}
    sampler = threading.Thread(
        target=lambda: result.update(
            idle_s=wait_idle(clock, result["hang_up"], idle_cores + IDLE_CORES)
        )
    )
    began = time.perf_counter()
    clients = hang_up_burst(url, data)
    result["hang_up"] = max(c.closed_at for c in clients)
    sampler.start()  # from the last hang-up
    sent = max(c.sent_at for c in clients)
    time.sleep(max(0.0, sent + ORDINARY_AFTER_S - time.perf_counter()))
    answer = ordinary(url, short_text)
    sampler.join()
    after_idle = rss_mib(pids)
    after = scrape(url)
    log.info("bench: burst: idle after %s s, ordinary request %s", result["idle_s"], answer)
    time.sleep(RSS_LATER_S)
    later = rss_mib(pids)

    # A 504 or 503 for the ordinary request may or may not have run its item; only a 200
    # surely did.
    gone = items_predicted(after) - items_predicted(before) - int(answer["status"] == 200)
    return {
        "clients": CLIENTS,
        "items_per_request": ITEMS,
        "body_bytes": len(data),
        "send_spread_ms": round(
            (max(c.sent_at for c in clients) - min(c.sent_at for c in clients)) * 1e3, 1
        ),
        "sends_ms": round((sent - began) * 1e3, 1),
        "send_errors": sum(c.error is not None for c in clients),
        "idle_cores_before": idle_cores,
        "ordinary": answer,
        "gone_items": round(gone),
        "idle_s": result["idle_s"],
        # None: the server has no such counter (before the fix)
        "abandoned": (grown(abandoned(before), abandoned(after)) if abandoned(after) else None),
        "errors": grown(errors(before), errors(after)),
        "workers": [
            {
                "pid": pid,
                "rss_ready_mib": ready[pid],
                "rss_after_mib": after_idle[pid],
                "rss_30s_mib": later[pid],
                "ratio": (round(later[pid] / ready[pid], 2) if later[pid] and ready[pid] else None),
            }
            for pid in pids
        ],
    }


def judge(r: dict[str, Any]) -> dict[str, bool]:
    """Each target: met or not (a worker that did not last 30 s misses the RSS one)."""
    return {
        "ordinary": (
            r["ordinary"]["status"] == 200 and r["ordinary"]["ms"] <= TARGET_ORDINARY_S * 1e3
        ),
        "gone_items": r["gone_items"] <= TARGET_GONE_ITEMS,
        "idle": r["idle_s"] is not None and r["idle_s"] <= TARGET_IDLE_S,
        "rss": bool(r["workers"])
        and all(w["ratio"] is not None and w["ratio"] <= TARGET_RSS_RATIO for w in r["workers"]),
    }


def short_and_long(settings: Settings) -> tuple[str, list[str]]:
    """The ordinary request's text (an SST-2 dev sentence) and the burst's long texts."""
    source = registry.serving(settings)[MODEL].data(settings)
    return load_sst2(source.folder, "dev").texts[0], sentiment_long_texts(source)


def burst(settings: Settings, models: list[str]) -> dict[str, Any]:
    """The scenario on a fresh dlserve server with `models` (sentiment among them) and
    WORKERS workers, started from this checkout's code and stopped afterwards."""
    if MODEL not in models:
        raise ValueError(f"the burst section needs the {MODEL} model (DLSERVE_MODELS)")
    short, texts = short_and_long(settings)
    server = http.dlserve_server("dlserve", models, DLSERVE_WORKERS=str(WORKERS))
    server.start()
    try:
        assert server.process is not None
        r = measure(
            server.url, server.process.pid, texts, short, max_body_bytes=settings.max_body_bytes
        )
    finally:
        server.stop()
    return {"models": models, "server_workers": WORKERS, **r, "met": judge(r)}


def run(ctx: BenchContext) -> dict[str, Any]:
    if MODEL not in ctx.sources:  # e.g. DLSERVE_MODELS=digits: nothing to burst with
        return {"skipped": f"the burst needs the {MODEL} model, which is not served here"}
    return burst(ctx.settings, list(ctx.sources))


# --- the report ----------------------------------------------------------------------------


def _counts(series: dict[str, float]) -> str:
    return ", ".join(f"{k}: {v:g}" for k, v in series.items()) or "none"


def _mark(met: bool) -> str:
    return "met" if met else "**missed**"


def render(r: dict[str, Any], _: dict[str, Any]) -> list[str]:
    if "skipped" in r:
        return ["## Hang-up burst", "", f"Not measured: {r['skipped']}.", ""]
    met = r["met"]
    o = r["ordinary"]
    idle = f"{r['idle_s']:g}" if r["idle_s"] is not None else f"> {IDLE_CAP_S:g}"
    abandoned_text = (
        "not counted by this server" if r["abandoned"] is None else _counts(r["abandoned"])
    )
    rows = [
        [
            "ordinary request: status, latency ms",
            f"{o['status']}, {o['ms']:,.0f}",
            f"200 in ≤ {TARGET_ORDINARY_S * 1e3:,.0f}",
            _mark(met["ordinary"]),
        ],
        [
            "items run for gone clients",
            f"{r['gone_items']:,}",
            f"≤ {TARGET_GONE_ITEMS:,}",
            _mark(met["gone_items"]),
        ],
        ["seconds from hang-up to idle", idle, f"≤ {TARGET_IDLE_S:g}", _mark(met["idle"])],
    ]
    for i, w in enumerate(r["workers"], 1):
        ok = w["ratio"] is not None and w["ratio"] <= TARGET_RSS_RATIO
        rows.append(
            [
                f"worker {i} RSS MiB: ready / after idle / 30 s later (ratio)",
                f"{w['rss_ready_mib']} / {w['rss_after_mib']} / {w['rss_30s_mib']} "
                f"({w['ratio'] if w['ratio'] is not None else 'exited'}×)",
                f"30 s later ≤ {TARGET_RSS_RATIO:g}× ready",
                _mark(ok),
            ]
        )
    return [
        "## Hang-up burst",
        "",
        f"One dlserve server, {r['server_workers']} workers ({', '.join(r['models'])}). "
        f"{r['clients']} clients each send one POST {PATH} of {r['items_per_request']} long "
        f"texts ({r['body_bytes'] / MIB:.2f} MiB; all sent within {r['send_spread_ms']:g} ms), "
        f"wait {HANG_UP_AFTER_S:g} s and hang up without reading the answer; "
        f"{ORDINARY_AFTER_S:g} s after the sends an ordinary client asks for one short text. "
        "Items run for gone clients: dlserve_items_predicted_total's growth less the ordinary "
        f"request's item. Idle: the server's processes use < {IDLE_CORES:g} cores above their "
        f"own idle use over {IDLE_WINDOW_S:g} s. Reproduce with `dlserve bench --only burst`; "
        "compare two checkouts with `python -m bench.burst` in each.",
        "",
        report.table(["measure", "value", "target", ""], rows),
        "",
        f"Requests counted abandoned (dlserve_requests_abandoned_total): {abandoned_text}. "
        f"Refused or failed (dlserve_errors_total, sentiment): {_counts(r['errors'])}.",
        "",
    ]


SECTION = Section("burst", run, render)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.burst",
        description="The hang-up burst on a fresh dlserve server from this checkout (models "
        "from the store in BENTOML_HOME), or on a running one (--url and --pid); "
        "prints the results as JSON.",
    )
    parser.add_argument(
        "--models",
        help="models to serve, comma-separated (default: "
        "DLSERVE_MODELS, or every registered model)",
    )
    parser.add_argument("--url", help="a running dlserve server, e.g. http://127.0.0.1:3000")
    parser.add_argument("--pid", type=int, help="the running server's root process id")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = load_settings(models=args.models)
    if args.url:
        if args.pid is None:
            parser.error("--url needs --pid (the `bentoml serve` process)")
        short, texts = short_and_long(settings)
        r = measure(
            args.url.rstrip("/"), args.pid, texts, short, max_body_bytes=settings.max_body_bytes
        )
        result = {**r, "met": judge(r)}
    else:
        result = burst(settings, list(registry.serving(settings)))
    # The results are this command's output (the log goes to stderr), for a script or a diff
    # of two checkouts.
    sys.stdout.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
