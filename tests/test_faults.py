"""Model and process faults, on real servers: a bad model stops start-up; readiness during
loading; a worker killed with SIGKILL under load; a SIGTERM drain with requests in flight."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
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
    digits_model: str, sentiment_model: str, recommender_model: str, tmp_path: Path, fault: str
) -> None:
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
        return (
            httpx.get(url + "/livez", timeout=1).status_code,
            httpx.get(url + "/readyz", timeout=1).status_code,
        )
    except httpx.HTTPError:
        return None


@pytest.fixture(scope="module")
def lifecycle(
    digits_model: str,
    sentiment_model: str,
    recommender_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Lifecycle]:
    """A 2-worker server watched from the moment it starts; the SIGTERM test ends it."""
    with start_server(
        tmp_path_factory.mktemp("lifecycle"),
        ready=False,
        DLSERVE_WORKERS="2",
        DLSERVE_DRAIN_DELAY_S="2",
        DLSERVE_DRAIN_TIMEOUT_S="15",
    ) as running:
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
                state.early_predict = httpx.post(
                    running.url + "/digits/predict", json=DIGIT, timeout=60
                )
            ready_in_a_row = ready_in_a_row + 1 if seen == (200, 200) else 0
        assert ready_in_a_row == 10, state.probes[-5:]
        yield state


def test_readyz_is_503_until_the_models_load_and_early_requests_wait_for_them(
    lifecycle: Lifecycle,
) -> None:
    assert (200, 503) in lifecycle.probes, lifecycle.probes[:20]
    # A predict request sent while the models load waits for them instead of failing.
    loading = lifecycle.early_predict
    assert loading is not None and loading.status_code == 200, loading.text
    assert lifecycle.probes[-1] == (200, 200)


def workers(server: Server) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process(server.process.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a killed worker may be gone, or a zombie
            if proc.status() != psutil.STATUS_ZOMBIE and "_bentoml_impl.worker.service" in " ".join(
                proc.cmdline()
            ):
                found.append(proc)
    return found


@pytest.mark.exclusive  # times the recovery
def test_a_killed_worker_is_restarted_after_a_short_burst_of_errors(lifecycle: Lifecycle) -> None:
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
    print(
        f"\nkill -9 of 1 of 2 workers under 4 clients: {len(failures)} failed of {len(log)} "
        f"requests, last failure {burst:.2f} s after the kill; replacement ready after "
        f"{recovered_at - killed_at:.1f} s"
    )
    assert all(ok for t, ok in log if t > recovered_at), "errors after the worker came back"
    assert sum(ok for t, ok in log if killed_at < t < recovered_at) > 0, (
        "the surviving worker did not keep serving"
    )


@pytest.mark.exclusive  # a time bound
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


def hanging_model(model: Path) -> None:
    """Replace a stored digits model with one that runs for hours on any bright pixel: a
    Loop whose trip count is the largest input value times 10^9 (an all-black image, the
    warm-up's, runs it zero times). A real ONNX model hanging inside a model run."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = lambda name, value, dtype=np.float32: numpy_helper.from_array(  # noqa: E731
        np.array(value, dtype=dtype), name
    )
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["count_in", "one"], ["count_out"]),
        ],
        "spin",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("count_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("count_out", TensorProto.FLOAT, []),
        ],
        initializer=[c("one", 1.0)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["pixels"], ["bright"]),
            helper.make_node("ReduceMax", ["bright"], ["peak"], keepdims=0),
            helper.make_node("Mul", ["peak", "scale"], ["trips_f"]),
            helper.make_node("Cast", ["trips_f"], ["trips"], to=TensorProto.INT64),
            helper.make_node("Loop", ["trips", "yes", "zero"], ["count"], body=body),
            helper.make_node("Mul", ["count", "zero"], ["nothing"]),
            helper.make_node("Shape", ["pixels"], ["shape"]),
            helper.make_node("Slice", ["shape", "start", "end"], ["batch"]),
            helper.make_node("Concat", ["batch", "ten"], ["out_shape"], axis=0),
            helper.make_node("Expand", ["nothing", "out_shape"], ["logits"]),
        ],
        "hang",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=[
            c("scale", 1e9),
            c("yes", True, np.bool_),
            c("zero", 0.0),
            c("start", [0], np.int64),
            c("end", [1], np.int64),
            c("ten", [10], np.int64),
        ],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9),
        str(model / ONNX_FILE),
    )
    manifest = model / MANIFEST_FILE
    text = manifest.read_text()
    old = text.split('"onnx_sha256": "')[1].split('"')[0]
    manifest.write_text(text.replace(old, sha256_file(model / ONNX_FILE)))


def private_store(tmp_path: Path, tag: str) -> tuple[Path, Path]:
    """A copy of the test model store; its home, and the folder of `tag`'s version."""
    home = tmp_path / "bentoml"
    shutil.copytree(Path(os.environ["BENTOML_HOME"]) / "models", home / "models")
    name, version = tag.split(":")
    return home, home / "models" / name / version


@pytest.mark.exclusive  # times the hang
def test_a_worker_hung_in_a_model_run_answers_504_and_is_replaced(
    digits_model: str, sentiment_model: str, recommender_model: str, tmp_path: Path
) -> None:
    home, model = private_store(tmp_path, digits_model)
    hanging_model(model)
    with start_server(
        tmp_path,
        BENTOML_HOME=str(home),
        DLSERVE_MODELS="digits",
        DLSERVE_WORKERS="1",
        DLSERVE_REQUEST_TIMEOUT_S="2",
        DLSERVE_HANG_TIMEOUT_S="4",
    ) as running:
        assert httpx.post(running.url + "/digits/predict", json=DIGIT).status_code == 200
        (worker,) = workers(running)
        bright = {"images": [[[255] * 28] * 28]}
        r = httpx.post(running.url + "/digits/predict", json=bright, timeout=30)
        assert r.status_code == 504 and "DLSERVE_REQUEST_TIMEOUT_S" in r.json()["error"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the hung worker exits; a new one serves
            now = workers(running)
            if now and now[0].pid != worker.pid and probe(running.url) == (200, 200):
                break
            time.sleep(0.3)
        assert httpx.post(running.url + "/digits/predict", json=DIGIT).status_code == 200
        assert workers(running)[0].pid != worker.pid
        assert re.search(
            r"digits: a model run has taken \d+ s \(DLSERVE_HANG_TIMEOUT_S=4\)", running.output()
        )


def test_model_files_removed_while_serving_keep_it_serving_and_stop_the_next_start(
    digits_model: str, sentiment_model: str, recommender_model: str, tmp_path: Path
) -> None:
    home, model = private_store(tmp_path, digits_model)
    with start_server(tmp_path, BENTOML_HOME=str(home), DLSERVE_WORKERS="1") as running:
        (model / ONNX_FILE).unlink()
        (model / MANIFEST_FILE).write_text("{}")
        for _ in range(5):  # the sessions are in memory: serving goes on
            assert httpx.post(running.url + "/digits/predict", json=DIGIT).status_code == 200
        assert httpx.get(running.url + "/readyz").status_code == 200
    with start_server(tmp_path, ready=False, BENTOML_HOME=str(home)) as again:
        again.process.wait(timeout=90)
        assert again.process.returncode not in (None, 0)
        assert "manifest.json is not a valid dlserve manifest" in again.output(), again.output()[
            -2000:
        ]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs mounted at `path` (root only; the test is skipped where it cannot)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): needs root")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_tmp_does_not_stop_serving(
    digits_model: str, sentiment_model: str, recommender_model: str, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "tmp", "64k") as tmp:
        with contextlib.suppress(OSError):
            (tmp / "filler").write_bytes(b"\0" * (1 << 20))  # fills it: ENOSPC
        with start_server(tmp_path, TMPDIR=str(tmp), DLSERVE_WORKERS="1") as running:
            assert httpx.post(running.url + "/digits/predict", json=DIGIT).status_code == 200
            assert httpx.post(running.url + "/sentiment/predict", json=HEAVY).status_code == 200
            assert httpx.get(running.url + "/metrics").status_code == 200


def test_an_unwritable_metrics_directory_stops_start_up_naming_it(
    digits_model: str, sentiment_model: str, recommender_model: str, tmp_path: Path
) -> None:
    home, _ = private_store(tmp_path, digits_model)
    with tmpfs(home / "prometheus_multiproc_dir", "64k", read_only=True) as metrics:
        with start_server(tmp_path, ready=False, BENTOML_HOME=str(home)) as running:
            running.process.wait(timeout=90)
            output = running.output()
        assert running.process.returncode not in (None, 0)
        assert f"{metrics} is not writable" in output, output[-2000:]
