"""`dlserve serve`, the README's main command: on an empty model store it must say what is
missing, train and export it (in child processes, so that it keeps none of PyTorch's
memory), then serve; a stop signal to it alone must stop everything it started and free
the port; a port already taken is one line and exit status 2."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import psutil
import pytest

from bench.http import free_port, stop_process_group, wait_ready
from cli.serve import STOP_MARGIN_S, StopSignals, check_port_free, relay_to_server, supervise
from dlserve import progress
from tests.conftest import dlserve, start_server

CLI = Path(sys.executable).with_name("dlserve")
MIB = 1024 * 1024
DRAIN_DELAY_S = 1.0
DRAIN_TIMEOUT_S = 10.0


def start_serve(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`dlserve serve ARGS` in a session of its own (so that stop_process_group can end it
    whatever happens), its output in `log_path`."""
    with log_path.open("w") as log:
        return subprocess.Popen(
            [str(CLI), "serve", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def tree(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def gone(process: psutil.Process) -> bool:
    try:  # a zombie has exited; only its parent's wait is missing
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def stop_everything(proc: subprocess.Popen[bytes], started: list[psutil.Process]) -> None:
    """Stop `dlserve serve`, then kill whatever of its tree it left (a failing test must
    not leave a server holding a port)."""
    stop_process_group(proc)
    for process in started:
        if not gone(process):
            process.kill()


def readyz(port: int) -> int | None:
    """/readyz's status code; None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def test_serve_serves_the_first_model_while_it_trains_the_next(
    tmp_path: Path, data_dir: Path
) -> None:
    """On an empty store: the quicker model (digits) is trained, exported and served first,
    in child processes; sentiment answers 503, saying that it is still training, and
    /readyz waits for it. A stop signal then ends the server and the training alike."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "DLSERVE_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "DLSERVE_MODELS": "sentiment,digits",
    }
    log_path = tmp_path / "serve.log"
    proc = start_serve(["--quick", "--port", str(port)], env, log_path)
    started: list[psutil.Process] = []
    try:
        image = {"images": [[[0] * 28] * 28]}
        answer = wait_for_answer(f"{url}/digits/predict", image, proc, log_path)
        assert answer.status_code == 200, answer.text
        waiting = httpx.post(f"{url}/sentiment/predict", json={"texts": ["Fine."]})
        ready = readyz(port)
        listed = httpx.get(f"{url}/models").json()
        # Training ran (and runs) in a child: the supervisor holds none of PyTorch's memory.
        supervisor = psutil.Process(proc.pid)
        rss = supervisor.memory_info().rss
        libraries = {m.path for m in supervisor.memory_maps()}
        started = tree(proc)
        os.kill(proc.pid, signal.SIGTERM)
        status = proc.wait(timeout=DRAIN_TIMEOUT_S + STOP_MARGIN_S + 30)
    finally:
        stop_everything(proc, started)
    output = log_path.read_text()
    # Digits first (the quicker), before the server; sentiment beside it.
    assert (
        output.index("model 'digits' is not trained yet: training it now (--quick)")
        < output.index("serving now; training sentiment meanwhile")
        < output.index("model 'sentiment' is not trained yet: training it now (--quick)")
    )
    assert waiting.status_code == 503, waiting.text
    assert "model sentiment is still being trained by `dlserve serve`" in waiting.json()["error"]
    assert 1 <= int(waiting.headers["Retry-After"]) <= 60
    assert ready == 503  # strict: every configured model
    # /models lists what is served, and what is still training with how far it has got.
    assert [m["name"] for m in listed["models"]] == ["digits"]
    assert [m["name"] for m in listed["training"]] == ["sentiment"]
    assert "sentiment is still being trained" in listed["training"][0]["message"]
    assert rss < 200 * MIB, f"dlserve serve holds {rss / MIB:.0f} MiB while serving"
    assert not [p for p in libraries if "libtorch" in p], "dlserve serve loaded PyTorch"
    # SIGTERM stopped the training child too: nothing it started is left.
    assert status == 0, output[-3000:]
    assert all(gone(p) for p in started), [p.pid for p in started if not gone(p)]
    assert not (tmp_path / "artifacts/sentiment/checkpoint.pt").exists()
    # Training reported its progress epoch by epoch (what the 503s quote).
    trained = progress.read(tmp_path / "artifacts/digits")
    assert trained is not None and trained.epochs_done == trained.epochs > 0


def test_a_model_joins_the_running_server_once_its_export_is_in_the_store(
    digits_model: str, recommender_model: str, tmp_path: Path
) -> None:
    """What `dlserve serve` relies on while it trains: a server told that digits is still
    training serves the recommender, answers digits with 503 (its training's progress),
    and serves digits without a restart once `dlserve export` has put it in the store.
    DLSERVE_READY_WHEN=any: /readyz says 200 with one model of the two."""
    home, artifacts = tmp_path / "bentoml", tmp_path / "artifacts"
    shared = Path(os.environ["BENTOML_HOME"]) / "models"
    shutil.copytree(shared / "recommender", home / "models" / "recommender", symlinks=True)
    shutil.copytree(Path(os.environ["DLSERVE_ARTIFACTS_DIR"]) / "digits", artifacts / "digits")
    # As the training's last epoch left it (tests/test_serve_command.py's first test sees
    # training write it): export is what is left.
    now = time.time()
    progress.write(artifacts / "digits", progress.Progress("digits", 4, 4, now - 30, now - 2))
    env = {
        "BENTOML_HOME": str(home),
        "DLSERVE_ARTIFACTS_DIR": str(artifacts),
        "DLSERVE_MODELS": "digits,recommender",
        "DLSERVE_STILL_TRAINING": "digits",
        "DLSERVE_READY_WHEN": "any",
    }
    image = {"images": [[[0] * 28] * 28]}
    with start_server(tmp_path, **env) as server:
        waiting = httpx.post(f"{server.url}/digits/predict", json=image)
        # The progress file of a training that has ended: export is what is left.
        export = dlserve("export", "digits", env={**os.environ, **env})
        tag = export.stdout.strip().splitlines()[-1]
        deadline = time.monotonic() + 30
        while (answer := httpx.post(f"{server.url}/digits/predict", json=image)).status_code != 200:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.2)
        listed = httpx.get(f"{server.url}/models").json()
    assert waiting.status_code == 503
    assert waiting.json()["error"].startswith(
        "model digits is still being trained by `dlserve serve` (training has ended; it is "
        "being exported, about "
    )
    assert answer.json()["model"] == tag
    assert {m["tag"] for m in listed["models"]} >= {tag} and listed["training"] == []


def wait_for_answer(
    url: str, body: object, proc: subprocess.Popen[bytes], log_path: Path
) -> httpx.Response:
    """The first answer of `url`, once `dlserve serve` has started the server."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (answer := try_post(url, body)) is not None:
            return answer
        time.sleep(0.5)
    pytest.fail(f"nothing answered {url}:\n{log_path.read_text()[-3000:]}")


def try_post(url: str, body: object) -> httpx.Response | None:
    """The response, or None while nothing listens on the port yet."""
    try:
        return httpx.post(url, json=body, timeout=10)
    except httpx.TransportError:
        return None


@pytest.mark.exclusive  # time bounds
@pytest.mark.parametrize(
    "signals",
    [
        pytest.param([signal.SIGTERM], id="SIGTERM"),
        pytest.param([signal.SIGINT], id="SIGINT"),
        pytest.param([signal.SIGTERM, signal.SIGTERM], id="SIGTERM-twice"),
    ],
)
def test_a_stop_signal_stops_everything_it_started(
    signals: list[signal.Signals], digits_model: str, tmp_path: Path
) -> None:
    """The signal goes to `dlserve serve` alone, as `kill PID` (or Kubernetes) sends it:
    the server, its workers and the port must all be gone within the drain timeout."""
    escalate = len(signals) > 1
    delay_s = 8.0 if escalate else DRAIN_DELAY_S  # long enough that skipping it shows
    port = free_port()
    env = {
        **os.environ,
        "DLSERVE_MODELS": "digits",
        "DLSERVE_DRAIN_DELAY_S": str(delay_s),
        "DLSERVE_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
    }
    log_path = tmp_path / "serve.log"
    proc = start_serve(["--port", str(port), "--workers", "2"], env, log_path)
    started: list[psutil.Process] = []
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout_s=180)
        started = tree(proc)
        assert len(started) >= 4, "expected dlserve serve, bentoml serve and two workers"
        sent_at = time.monotonic()
        statuses: list[int | None] = []
        for i, sig in enumerate(signals):
            if i:
                time.sleep(0.5)
            os.kill(proc.pid, sig)
        while proc.poll() is None and time.monotonic() - sent_at < DRAIN_TIMEOUT_S + 10:
            statuses.append(readyz(port))
            time.sleep(0.1)
        took_s = time.monotonic() - sent_at
        exited = proc.poll()
    finally:
        stop_everything(proc, started)
    log = log_path.read_text()[-3000:]
    assert exited == 0, f"exit status {exited} after {took_s:.1f} s:\n{log}"
    assert took_s < DRAIN_TIMEOUT_S + STOP_MARGIN_S, log
    left = [p.pid for p in psutil.wait_procs(started, timeout=5)[1] if not gone(p)]
    assert not left, f"still running after dlserve serve exited: {left}"
    check_port_free(port)  # raises PortInUseError if anything still listens
    if signals == [signal.SIGTERM]:  # a drain: not ready, yet still answering, for a while
        assert 503 in statuses, statuses
    if escalate:  # the second SIGTERM cut the 8 s drain delay short
        assert took_s < delay_s - 1, f"took {took_s:.1f} s:\n{log}"


def test_a_port_in_use_is_one_line_and_status_2() -> None:
    with socket.socket() as held:  # a listener on 127.0.0.1 also blocks 0.0.0.0
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(
            [str(CLI), "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "DLSERVE_MODELS": "digits"},
        )
        took_s = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert took_s < 30, f"took {took_s:.1f} s"  # the check comes before any training
    (line,) = result.stderr.splitlines()
    assert line.startswith(
        f"dlserve: error: port {port} is already in use (by pid {os.getpid()}: "
    ), line


def test_a_failed_training_is_one_line_and_status_2(
    tmp_path: Path, http_mirror: tuple[str, Path]
) -> None:
    """The training child fails (no data, and the mirror has none): its own message, then
    one line from `dlserve serve`, exit status 2, no traceback, no server started."""
    url, _ = http_mirror  # an empty folder: every download is a 404
    env = {
        **os.environ,
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "DLSERVE_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "DLSERVE_DATA_DIR": str(tmp_path / "data"),
        "DLSERVE_MNIST_URL": url,
        "DLSERVE_MODELS": "digits",
    }
    result = subprocess.run(
        [str(CLI), "serve", "--quick", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (
        "dlserve: error: `dlserve train digits --quick` failed (exit status 2); "
        "its messages are above"
    )


# Ignores SIGTERM and SIGINT, and so does the child it starts in a session of its own (as
# circus starts a worker): only SIGKILL ends them. Writes the child's pid to argv[1].
STUBBORN = """
import os, signal, subprocess, sys, time
ignore = "import signal, time; [signal.signal(s, signal.SIG_IGN) for s in (2, 15)]"
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", ignore + "; time.sleep(60)"],
                         start_new_session=True)
with open(sys.argv[1], "w") as out:
    out.write(str(child.pid))
time.sleep(60)
"""


@pytest.mark.exclusive  # time bounds
def test_what_ignores_the_signal_is_killed_after_the_timeout(tmp_path: Path) -> None:
    """supervise() itself, with a server that will not stop: SIGKILL for its whole tree
    `stop_s` after the signal, and the exit status says so (128 + SIGKILL)."""
    signals = StopSignals()  # not installed: the test plays the signal's part
    out = tmp_path / "pid"
    timer = threading.Timer(1.0, signals.received.append, args=(signal.SIGTERM,))
    timer.start()
    started = time.monotonic()
    try:
        status = supervise(
            [sys.executable, "-c", STUBBORN, str(out)], signals, stop_s=2.0, relay=relay_to_server
        )
        took_s = time.monotonic() - started
    finally:
        timer.cancel()
        pid = int(out.read_text()) if out.is_file() else None
        left = still_running(pid) if pid is not None else None
        if left is not None:
            left.kill()  # (what the test checks did not happen)
    assert status == 128 + signal.SIGKILL
    assert 3.0 <= took_s < 10, f"took {took_s:.1f} s"
    assert pid is not None and left is None


def still_running(pid: int) -> psutil.Process | None:
    """The process, unless it has exited (reaped already, or a zombie)."""
    try:
        process = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
    return None if gone(process) else process


@pytest.mark.parametrize("killed", ["server", "supervisor"])
def test_nothing_outlives_a_killed_process(killed: str, digits_model: str, tmp_path: Path) -> None:
    """SIGKILL (the OOM killer, `kill -9`) for BentoML's arbiter: `dlserve serve` stops the
    workers it leaves and exits with 128 + 9. For `dlserve serve` itself: the arbiter gets
    SIGTERM from the kernel (PR_SET_PDEATHSIG) and drains. Either way nothing is left."""
    port = free_port()
    env = {
        **os.environ,
        "DLSERVE_MODELS": "digits",
        "DLSERVE_DRAIN_DELAY_S": "1",
        "DLSERVE_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
    }
    log_path = tmp_path / "serve.log"
    proc = start_serve(["--port", str(port), "--workers", "2"], env, log_path)
    started: list[psutil.Process] = []
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout_s=180)
        started = tree(proc)
        server = next(p for p in started if p.ppid() == proc.pid)
        (server if killed == "server" else started[0]).kill()
        proc.wait(timeout=DRAIN_TIMEOUT_S + STOP_MARGIN_S)
        _, alive = psutil.wait_procs(started, timeout=DRAIN_TIMEOUT_S + STOP_MARGIN_S)
        left = [p.pid for p in alive if not gone(p)]
    finally:
        stop_everything(proc, started)
    log = log_path.read_text()[-3000:]
    assert proc.returncode == (128 + signal.SIGKILL if killed == "server" else -signal.SIGKILL)
    assert not left, f"still running: {left}\n{log}"
    check_port_free(port)
