"""HTTP measurements: real servers on free ports, loaded by wrk, side by side.

The load generator is wrk (C, one event loop per thread): it costs far less CPU per
request than any Python client, which matters on a 2-core machine where it shares the
cores with the server under test. `wrk_requests.lua` replays prepared request bodies and
prints a JSON summary (wrk's own HdrHistogram latency percentiles). Each server under test
is a real process: `bentoml serve` for dlserve, uvicorn for the naive FastAPI peer.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import psutil

from bench.workloads import Request
from dlserve import allocator

LUA_SCRIPT = Path(__file__).with_name("wrk_requests.lua")
MIXED_SCRIPT = Path(__file__).with_name("wrk_mixed.lua")
# The models the hand-written peers have a route for (bench/peers/lean.py, litserve_peer.py),
# and those BentoML's batchable API fits: a batch axis (bench/peers/bentoml_batchable.py).
LEAN_MODELS = ("digits", "sentiment", "recommender")
BATCHABLE_MODELS = ("digits", "sentiment")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
IDLE_SETTLE_S = 3.0  # after a server first answers ready, before its idle CPU is measured
IDLE_WINDOW_S = 2.0
BUSY_CORES = 0.1  # above its idle use: still working through requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(process: subprocess.Popen[Any]) -> None:
    """Stop a server started with start_new_session=True and every process it spawned
    (bentoml serve runs its workers as child processes), as Ctrl-C to `dlserve serve` would:
    SIGINT to the group and to every process below it in a session of its own, which skips
    the drain delay a SIGTERM gets (DLSERVE_DRAIN_DELAY_S). BentoML's arbiter answers SIGINT
    with a SIGTERM to each worker, and runs each in a session of its own, so SIGINT to the
    group alone made every stop wait out the delay (5 s by default, in each of the tests'
    ~60 server stops). SIGKILL for what is left after 20 s."""
    if process.poll() is not None:
        return
    below = _below(process.pid)
    os.killpg(process.pid, signal.SIGINT)
    for child in below:
        # Only those the group's signal missed: a second SIGINT makes uvicorn skip its
        # shutdown, and interrupts a plain Python process's clean-up.
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(child.pid) != process.pid:
                child.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        below += _below(process.pid)  # including any started since (a respawned worker)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    _, alive = psutil.wait_procs(below, timeout=5)
    for child in alive:  # whatever of the tree outlived its leader
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=5)


def _below(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def wait_ready(
    url: str, process: subprocess.Popen[Any], timeout_s: float = 180.0, path: str = "/readyz"
) -> None:
    """Poll `url + path` until it answers 200; fail at once if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{url}: the server exited with {process.returncode} before it was ready"
            )
        try:
            with urllib.request.urlopen(url + path, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} was not ready within {timeout_s:.0f} s")


def find_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise FileNotFoundError(
            "wrk (the HTTP load generator) is not installed: run `make bench-tools` "
            "(apt-get install wrk) or put wrk on PATH"
        )
    return wrk


def wrk_version() -> str:
    out = subprocess.run([find_wrk(), "--version"], capture_output=True, text=True).stdout
    return out.split(" Copyright")[0].strip() or "wrk"


@dataclass
class Server:
    """One server under test, started with `start()` and stopped with `stop()`."""

    name: str
    command: list[str]
    env: dict[str, str]
    ready_path: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_dir: Path | None = None  # where its log goes; a temporary file when None
    log_path: Path | None = None
    private_home: Path | None = None  # a private_bentoml_home(), removed by stop()
    serves: frozenset[str] | None = None  # the models it can serve; None: every one
    batch_metrics: bool = False  # its /metrics has dlserve_batch_items (dlserve itself)
    idle_cpu: float = 0.0  # cores it uses while ready and unloaded: measure_idle()
    paused: bool = False
    cwd: Path = PROJECT_ROOT  # another checkout, to compare a change with what it replaces

    def can_serve(self, model: str) -> bool:
        return self.serves is None or model in self.serves

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0, *, wait: bool = True) -> None:
        """Start the process and, if `wait`, return once it answers ready."""
        fd, log = tempfile.mkstemp(
            prefix=f"dlserve-{self.name}-{self.port}-", suffix=".log", dir=self.log_dir
        )
        self.log_path = Path(log)
        command = [c.replace("{port}", str(self.port)) for c in self.command]
        self.process = subprocess.Popen(
            command,
            cwd=self.cwd,
            env={**os.environ, **self.env},
            stdout=fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        os.close(fd)
        if wait:
            self.wait_until_ready(timeout_s)

    def wait_until_ready(self, timeout_s: float = 180.0) -> None:
        """Return once the started server answers ready; stop it and say why if it cannot."""
        assert self.process is not None, f"{self.name}: not started"
        try:
            wait_ready(self.url, self.process, timeout_s, self.ready_path)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise type(exc)(
                f"{self.name}: {exc}; see {self.log_path}:\n" + self.output()[-2000:]
            ) from None

    def processes(self) -> list[psutil.Process]:
        """The server's process and every process it has spawned."""
        if self.process is None or self.process.poll() is not None:
            return []
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def signal_all(self, signum: int) -> None:
        """`signum` to every process of the server: BentoML's workers each run in a session
        of their own, which a signal to the server's group does not reach. SIGCONT goes to
        the workers before their parent, which may act on their state as soon as it runs."""
        processes = self.processes()
        for p in reversed(processes) if signum == signal.SIGCONT else processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signum)

    def cpu_used(self, window_s: float) -> float:
        """Cores the server's processes used over the next `window_s` seconds."""

        def total(procs: list[psutil.Process]) -> float:
            seconds = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    seconds += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
            return seconds

        procs = self.processes()
        before = total(procs)
        time.sleep(window_s)
        return (total(procs) - before) / window_s

    def measure_idle(self, *, settle: bool = True) -> float:
        """Cores the server uses while ready and unloaded (`idle_cpu`), once its start-up
        work is done (`settle`: wait for that here)."""
        if settle:
            time.sleep(IDLE_SETTLE_S)
        self.idle_cpu = round(self.cpu_used(IDLE_WINDOW_S), 2)
        return self.idle_cpu

    def pause(self, timeout_s: float = 30.0) -> None:
        """Stop (SIGSTOP) every process of the server once it has finished what wrk left
        behind, so that it takes no CPU while another server is measured: a server that
        spins while idle (LitServe's inference loops poll their queues; `idle_cpu`) would
        otherwise slow whichever server is under load. Waiting for the work to end first
        keeps a model run from being frozen half-way (dlserve's watchdog would take it
        for a hung run)."""
        deadline = time.monotonic() + timeout_s
        while (
            self.cpu_used(IDLE_WINDOW_S / 4) > self.idle_cpu + BUSY_CORES
            and time.monotonic() < deadline
        ):
            pass
        if self.process is not None and self.process.poll() is None:
            self.signal_all(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """Undo pause(), and wait until the server answers its readiness check again."""
        if self.paused and self.process is not None:
            self.signal_all(signal.SIGCONT)
            self.paused = False
            wait_ready(self.url, self.process, 30.0, self.ready_path)

    def output(self) -> str:
        """What the server has printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self) -> None:
        try:
            if self.paused and self.process is not None and self.process.poll() is None:
                self.signal_all(signal.SIGCONT)  # a stopped process ignores SIGINT
                self.paused = False
            if self.process is not None:
                stop_process_group(self.process)
        finally:
            if self.private_home is not None:
                shutil.rmtree(self.private_home, ignore_errors=True)  # the link, not the models

    def metrics_text(self) -> str:
        # Generous: right after a cell far past capacity (32 texts × 64 clients, unbatched)
        # a worker still runs the requests wrk left behind, and a 5 s scrape timed out.
        with urllib.request.urlopen(self.url + "/metrics", timeout=60) as r:
            return r.read().decode()

    def connection_split(self) -> tuple[list[int], int]:
        """Open client connections held by each of the server's processes, most first:
        how evenly the kernel and the workers' accept() calls spread the clients; and how
        many wait in the listening socket's queue, accepted by no process yet (a busy
        worker's event loop accepts late: on a loaded machine that was most of 64). One
        read of the kernel's socket table, so that a connection that moves from one worker
        to another while the processes are looked at is not counted twice."""
        pids = {p.pid for p in self.processes()}
        established = [
            c
            for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == self.port
        ]
        held = Counter(c.pid for c in established if c.pid in pids)
        waiting = sum(c.pid is None for c in established)
        return sorted(held.values(), reverse=True), waiting


def private_bentoml_home(name: str) -> Path:
    """A BENTOML_HOME of its own that shares the model store: BentoML keeps its Prometheus
    multiprocess files under BENTOML_HOME and wipes them when a server starts, so two
    servers on one home would spoil each other's /metrics."""
    shared = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    home = Path(tempfile.mkdtemp(prefix=f"dlserve-{name}-home-"))
    (home / "models").symlink_to(shared / "models", target_is_directory=True)
    return home


def dlserve_server(name: str, models: list[str], **settings: str) -> Server:
    """The dlserve service, as `dlserve serve` starts it, on 127.0.0.1; settings are
    environment overrides (DLSERVE_*). Unless they name a BENTOML_HOME, it gets a private
    one sharing the model store."""
    home = None if "BENTOML_HOME" in settings else private_bentoml_home(name)
    env = {
        "DLSERVE_MODELS": ",".join(models),
        **({"BENTOML_HOME": str(home)} if home else {}),
        # gRPC off unless asked for: the bench runs servers side by side, whose workers
        # would all share the default gRPC port (SO_REUSEPORT).
        "DLSERVE_GRPC_PORT": "0",
        **settings,
    }
    # The allocator `dlserve serve` would give it (dlserve/allocator.py); the server itself
    # refuses a DLSERVE_ALLOCATOR it does not know.
    seen = {**os.environ, **env}
    choice = cast(allocator.Choice, seen.get("DLSERVE_ALLOCATOR", "auto"))
    env |= allocator.server_env(choice, seen)
    return Server(
        name,
        [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            "service.app:DLServe",
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
        ],
        env,
        "/readyz",
        private_home=home,
        batch_metrics=True,
    )


def uvicorn_server(
    name: str,
    app: str,
    models: list[str],
    workers: int,
    *,
    ready_path: str = "/health",
    serves: frozenset[str] | None = None,
) -> Server:
    """A peer from bench/peers/ under uvicorn, with as many worker processes as dlserve."""
    return Server(
        name,
        [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--port",
            "{port}",
            "--workers",
            str(workers),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        {"DLSERVE_MODELS": ",".join(models)},
        ready_path,
        serves=serves,
    )


def naive_server(models: list[str], workers: int = 1) -> Server:
    """The naive FastAPI + uvicorn peer."""
    return uvicorn_server("naive", "bench.peers.naive:app", models, workers, ready_path="/docs")


def lean_server(models: list[str], workers: int) -> Server:
    """The lean hand-written Starlette + orjson peer (no batching)."""
    return uvicorn_server(
        "lean", "bench.peers.lean:app", models, workers, serves=frozenset(LEAN_MODELS)
    )


def ceiling_server(models: list[str], workers: int) -> Server:
    """Parse the JSON and answer, no model: the HTTP ceiling."""
    return uvicorn_server("ceiling", "bench.peers.ceiling:app", models, workers)


def bentoml_batchable_server(models: list[str], workers: int) -> Server:
    """BentoML's own `batchable=True` APIs, its defaults otherwise."""
    served = [m for m in models if m in BATCHABLE_MODELS]
    home = private_bentoml_home("batchable")
    return Server(
        "bentoml-batchable",
        [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            "bench.peers.bentoml_batchable:Batchable",
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
        ],
        {
            "DLSERVE_MODELS": ",".join(served),
            "DLSERVE_WORKERS": str(workers),
            "BENTOML_HOME": str(home),
        },
        "/readyz",
        private_home=home,
        serves=frozenset(served),
    )


def litserve_server(models: list[str], workers: int) -> Server:
    """LitServe with its batching."""
    return Server(
        "litserve",
        [sys.executable, "-m", "bench.peers.litserve_peer", "{port}"],
        {"DLSERVE_MODELS": ",".join(models), "DLSERVE_WORKERS": str(workers)},
        "/health",
        serves=frozenset(LEAN_MODELS),
    )


def batch_stats(metrics_text: str) -> dict[str, tuple[float, float]]:
    """Per model, (sum, count) of the dlserve_batch_items histogram on /metrics."""
    out: dict[str, list[float]] = {}
    pattern = r'^dlserve_batch_items_(sum|count)\{[^}]*model="([^"]+)"[^}]*\} (\S+)$'
    for kind, model, value in re.findall(pattern, metrics_text, flags=re.M):
        pair = out.setdefault(model, [0.0, 0.0])
        pair[0 if kind == "sum" else 1] += float(value)
    return {m: (s, c) for m, (s, c) in out.items()}


def mean_batch(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> float | None:
    """Mean items per model run between two scrapes, over all models."""
    items = sum(after[m][0] - before.get(m, (0, 0))[0] for m in after)
    runs = sum(after[m][1] - before.get(m, (0, 0))[1] for m in after)
    return round(items / runs, 2) if runs else None


def run_wrk(
    url: str, requests: list[Request], *, clients: int, duration_s: float, threads: int = 1
) -> dict[str, Any]:
    """Hold `clients` connections, each sending its next request as soon as the last is
    answered, for `duration_s`; wrk's summary with throughput and latency in ms."""
    lines = b"".join(path.encode() + b"\t" + body + b"\n" for path, body in requests)
    return _wrk(url, LUA_SCRIPT, lines, clients=clients, duration_s=duration_s, threads=threads)


def run_wrk_mixed(
    url: str, requests: list[tuple[str, str, bytes]], *, clients: int, duration_s: float
) -> dict[str, Any]:
    """run_wrk for requests of any body type, (path, content type, body), with the answers
    counted by status class (status_2xx, status_4xx, status_5xx)."""
    records = b"".join(
        b"%s\n%s\n%d\n%s" % (path.encode(), kind.encode(), len(body), body)
        for path, kind, body in requests
    )
    return _wrk(url, MIXED_SCRIPT, records, clients=clients, duration_s=duration_s)


def _wrk(
    url: str, script: Path, requests: bytes, *, clients: int, duration_s: float, threads: int = 1
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("wb", suffix=".requests", delete=False) as f:
        f.write(requests)
    try:
        out = subprocess.run(
            [
                find_wrk(),
                f"-t{min(threads, clients)}",
                f"-c{clients}",
                f"-d{duration_s:g}s",
                "--timeout",
                "10s",
                "-s",
                str(script),
                url,
                "--",
                f.name,
            ],
            capture_output=True,
            text=True,
            timeout=duration_s + 60,
            check=True,
        ).stdout
    finally:
        os.unlink(f.name)
    line = next(x for x in out.splitlines() if x.startswith("DLSERVE_RESULT "))
    raw = orjson.loads(line.removeprefix("DLSERVE_RESULT "))
    seconds = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "requests_per_s": round(raw["requests"] / seconds, 1),
        "non_2xx": raw["non_2xx"],
        "socket_errors": raw["socket_errors"] + raw["timeouts"],
        **{k: round(raw[f"{k}_us"] / 1e3, 2) for k in ("p50", "p95", "p99", "mean", "max")},
        **{k: raw[k] for k in ("status_2xx", "status_4xx", "status_5xx") if k in raw},
    }


def send_at_once(
    url: str, request: tuple[str, str, bytes], *, clients: int, timeout_s: float = 120.0
) -> list[dict[str, Any]]:
    """Send one request (path, content type, body) from `clients` threads at the same
    moment, each on a connection of its own: a burst, as many clients retrying together
    make. Per answer: its status (0 when none came: a connection error or a timeout),
    whether it carried Retry-After, and its seconds."""
    import httpx  # a dependency of BentoML's; only the bursts need it

    path, kind, body = request
    start = threading.Barrier(clients)  # every thread ready, then all sent together

    def send(_: int) -> dict[str, Any]:
        with httpx.Client(base_url=url, timeout=timeout_s) as client:
            start.wait()
            began = time.perf_counter()
            try:
                r = client.post(path, content=body, headers={"Content-Type": kind})
                status, retry = r.status_code, "retry-after" in r.headers
            except httpx.HTTPError:
                status, retry = 0, False
            return {
                "status": status,
                "retry_after": retry,
                "seconds": round(time.perf_counter() - began, 3),
            }

    with ThreadPoolExecutor(clients, thread_name_prefix="burst") as pool:
        return list(pool.map(send, range(clients)))
