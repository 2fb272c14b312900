"""Model and process faults, on real servers: a bad model stops start-up; readiness during
loading; a worker killed with SIGKILL under load; a SIGTERM drain with requests in flight."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from bench.http import Server
from dlserve.hashing import sha256_file
from dlserve.manifest import MANIFEST_FILE, ONNX_FILE
from tests.conftest import start_server
from tests.test_no_pickle import onnx_with_external_weight

DIGIT = {"images": [[[0] * 28] * 28]}
HEAVY = {"texts": ["word " * 20_000] * 80}  # ~1 s of tokenising per request


def truncate(model: Path) -> None:
    path = model / ONNX_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(model: Path) -> None:
    data = bytearray((model / ONNX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (model / ONNX_FILE).write_bytes(bytes(data))


def point_weights_outside(model: Path) -> None:
    onnx_with_external_weight(model, "../../../../../etc/hostname")
    manifest = model / MANIFEST_FILE
    text = manifest.read_text()
    old = text.split('"onnx_sha256": "')[1].split('"')[0]
    manifest.write_text(text.replace(old, sha256_file(model / ONNX_FILE)))


FAULTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing ONNX file": (lambda m: (m / ONNX_FILE).unlink(), r"model.onnx is missing"),
    "truncated ONNX file": (truncate, r"model.onnx has SHA-256 \w+ but its manifest says"),
    "tampered ONNX file": (flip_a_byte, r"model.onnx has SHA-256 \w+ but its manifest says"),
    "missing manifest": (lambda m: (m / MANIFEST_FILE).unlink(), r"manifest.json is missing"),
    "weights outside the folder": (point_weights_outside, r"reads its data from .*outside"),
    "model not in the store": (lambda m: shutil.rmtree(m.parent), r"not in the model store"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_bad_model_stops_start_up_naming_the_file_and_the_fix(
        digits_model: str, sentiment_model: str, recommender_model: str,
        tmp_path: Path, fault: str) -> None:
    home = tmp_path / "bentoml"
    shutil.copytree(Path(os.environ["BENTOML_HOME"]) / "models", home / "models")
    name, version = digits_model.split(":")
    model = home / "models" / name / version
    damage, message = FAULTS[fault]
    damage(model)
    with start_server(tmp_path, ready=False, BENTOML_HOME=str(home)) as running:
        answered = []
        deadline = time.monotonic() + 90
        while running.process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                answered.append(httpx.get(running.url + "/readyz", timeout=1).status_code)
            time.sleep(0.2)
        assert running.process.poll() not in (None, 0), "the server did not stop"
        output = running.output()
    assert 200 not in answered, "a half-loaded server answered ready"
    assert re.search(message, output), output[-3000:]
    assert "dlserve export" in output, output[-3000:]
    if fault != "model not in the store":
        assert str(model) in output, output[-3000:]


@dataclass
class Lifecycle:
    server: Server
    probes: list[tuple[int, int]] = field(default_factory=list)  # (livez, readyz) at start-up
    early_predict: httpx.Response | None = None


def probe(url: str) -> tuple[int, int] | None:
    try:
        return (httpx.get(url + "/livez", timeout=1).status_code,
                httpx.get(url + "/readyz", timeout=1).status_code)
    except httpx.HTTPError:
        return None


@pytest.fixture(scope="module")
def lifecycle(digits_model: str, sentiment_model: str, recommender_model: str,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lifecycle]:
    """A 2-worker server watched from the moment it starts; the SIGTERM test ends it."""
    with start_server(tmp_path_factory.mktemp("lifecycle"), ready=False, DLSERVE_WORKERS="2",
                      DLSERVE_DRAIN_DELAY_S="2", DLSERVE_DRAIN_TIMEOUT_S="15") as running:
        state = Lifecycle(running)
        deadline = time.monotonic() + 120
        ready_in_a_row = 0
        while ready_in_a_row < 10 and time.monotonic() < deadline:
            seen = probe(running.url)
            if seen is None:
                time.sleep(0.01)
                continue
            state.probes.append(seen)
            if seen[1] == 503 and state.early_predict is None:
                state.early_predict = httpx.post(running.url + "/digits/predict", json=DIGIT,
                                                 timeout=60)
            ready_in_a_row = ready_in_a_row + 1 if seen == (200, 200) else 0
        assert ready_in_a_row == 10, state.probes[-5:]
        yield state


def test_readyz_is_503_until_the_models_load_and_early_requests_wait_for_them(
        lifecycle: Lifecycle) -> None:
    assert (200, 503) in lifecycle.probes, lifecycle.probes[:20]
    # A predict request sent while the models load waits for them instead of failing.
    loading = lifecycle.early_predict
    assert loading is not None and loading.status_code == 200, loading.text
    assert lifecycle.probes[-1] == (200, 200)


def workers(server: Server) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process(server.process.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a killed worker may be gone, or a zombie
            if proc.status() != psutil.STATUS_ZOMBIE and \
                    "_bentoml_impl.worker.service" in " ".join(proc.cmdline()):
                found.append(proc)
    return found


def test_a_killed_worker_is_restarted_after_a_short_burst_of_errors(
        lifecycle: Lifecycle) -> None:
    url = lifecycle.server.url
    before = workers(lifecycle.server)
    assert len(before) == 2
    log: list[tuple[float, bool]] = []  # (time, succeeded)
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    ok = client.post(url + "/digits/predict", json=DIGIT).status_code == 200
                except httpx.HTTPError:
                    ok = False
                log.append((time.monotonic(), ok))

    with ThreadPoolExecutor(4) as pool:
        try:
            for _ in range(4):
                pool.submit(load)
            time.sleep(1)
            before[0].send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            deadline = killed_at + 60
            while time.monotonic() < deadline:
                now = workers(lifecycle.server)
                if len(now) == 2 and all(probe(url) == (200, 200) for _ in range(5)):
                    break
                time.sleep(0.2)
            recovered_at = time.monotonic()
            time.sleep(2)
        finally:
            stop.set()
    after = workers(lifecycle.server)
    assert len(after) == 2 and before[0].pid not in [p.pid for p in after]
    failures = [t for t, ok in log if not ok]
    burst = (max(failures) - killed_at) if failures else 0.0
    print(f"\nkill -9 of 1 of 2 workers under 4 clients: {len(failures)} failed of {len(log)} "
          f"requests, last failure {burst:.2f} s after the kill; replacement ready after "
          f"{recovered_at - killed_at:.1f} s")
    assert all(ok for t, ok in log if t > recovered_at), "errors after the worker came back"
    assert sum(ok for t, ok in log if killed_at < t < recovered_at) > 0, \
        "the surviving worker did not keep serving"


def test_sigterm_drains_in_flight_requests_and_exits_in_time(lifecycle: Lifecycle) -> None:
    server = lifecycle.server
    signalled = threading.Event()
    finished: list[tuple[int, bool]] = []  # (status, ended after the SIGTERM)

    def post(_: int) -> None:
        r = httpx.post(server.url + "/sentiment/predict", json=HEAVY, timeout=30)
        finished.append((r.status_code, signalled.is_set()))

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post, i) for i in range(4)]
        time.sleep(0.3)
        os.kill(server.process.pid, signal.SIGTERM)
        signalled.set()
        sent_at = time.monotonic()
        seen = [probe(server.url) for _ in range(5)]
        assert (200, 503) in seen, f"readiness did not turn 503: {seen}"
        for f in futures:
            f.result()
    server.process.wait(timeout=15 + 5)
    exited_after = time.monotonic() - sent_at
    assert [status for status, _ in finished] == [200] * 4, finished
    assert any(after for _, after in finished), "no request was still in flight at the SIGTERM"
    assert exited_after < 15, f"exited {exited_after:.1f} s after SIGTERM"
