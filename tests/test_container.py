"""The image, built and run for real (`make container-test`): `bentoml build`, then
deploy/docker/build-image.sh (`bentoml containerize`, no registry reached from inside the
build), then the container, read-only as in Kubernetes: ready on /readyz and healthy by
its own HEALTHCHECK, one valid and one bad request on every route it publishes, /models
and /metrics, and a drain on SIGTERM.

Needs a Docker engine (Debian's docker.io: `make container-tools`); where `docker info`
fails, dockerd is started for the tests and stopped after them; where there is no engine
at all, the tests are skipped, saying so. `make test` runs them only when
DLSERVE_CONTAINER_TEST=1 or when the caches of an earlier build are there (the base
image and every wheel): a first build takes minutes (docs/testing.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.http import free_port, stop_process_group
from dlserve import registry
from dlserve.settings import get_settings
from tests.conftest import ROOT
from tests.routes import post, route_cases

IMAGE = "dlserve-test:cpu"
BASE_IMAGE = "dlserve-base:bookworm"
BUILD = ROOT / "deploy" / "docker" / "build-image.sh"
WHEELHOUSE = Path(os.environ.get("WHEELHOUSE", Path.home() / ".cache/dlserve/wheels"))
DRAIN_DELAY_S = 2
# The engine's own client (docker.io's); a newer one elsewhere on PATH may want buildx.
DOCKER = shutil.which("docker", path="/usr/bin") or shutil.which("docker")


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    assert DOCKER is not None
    result = subprocess.run(
        [DOCKER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {result.stderr[-2000:]}")
    return result.stdout.strip()


def logs(name: str) -> str:
    """The container's output (the service logs to stderr)."""
    assert DOCKER is not None
    result = subprocess.run([DOCKER, "logs", name], capture_output=True, text=True, timeout=60)
    return (result.stdout + result.stderr)[-3000:]


def engine_answers() -> bool:
    return (
        DOCKER is not None
        and subprocess.run([DOCKER, "info"], capture_output=True, timeout=30).returncode == 0
    )


def caches_warm() -> bool:
    """Whether an earlier build left the base image and a wheelhouse behind."""
    return (
        engine_answers()
        and subprocess.run([DOCKER, "image", "inspect", BASE_IMAGE], capture_output=True).returncode
        == 0
        and any(WHEELHOUSE.glob("onnxruntime*.whl"))
    )


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A Docker engine that answers: the running one, or dockerd started here."""
    if DOCKER is None:
        pytest.skip("no Docker client or engine: install docker.io (make container-tools)")
    if engine_answers():
        yield
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None or os.geteuid() != 0:
        pytest.skip(
            "no Docker engine answers and none can be started here "
            "(dockerd needs docker.io and root)"
        )
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    process = subprocess.Popen(
        [dockerd], stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while not engine_answers():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"dockerd could not be started: {log.read_text()[-1000:]}")
            time.sleep(0.5)
        yield
    finally:
        stop_process_group(process)


@pytest.fixture(scope="module")
def image(engine: None, bento: Path) -> str:
    """The CPU image of this checkout's Bento; the previous test image is removed."""
    enabled = os.environ.get("DLSERVE_CONTAINER_TEST", "auto")
    if enabled == "0" or (enabled == "auto" and not caches_warm()):
        pytest.skip(
            "a first image build takes minutes (base image, wheels): run `make "
            "container-test`, or set DLSERVE_CONTAINER_TEST=1"
        )
    previous = docker("image", "inspect", "-f", "{{.Id}}", IMAGE, check=False)
    tag = f"dlserve:{bento.name}"
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(BUILD), "cpu", IMAGE, tag],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "PYTHON": sys.executable, "WHEELHOUSE": str(WHEELHOUSE)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"\nimage built in {time.monotonic() - started:.0f} s")
    current = docker("image", "inspect", "-f", "{{.Id}}", IMAGE)
    if previous and previous != current:
        docker("rmi", previous, check=False)
    return IMAGE


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[tuple[str, str]]:
    """The image running read-only (as the Kubernetes manifests run it) with 2 workers;
    yields (container name, base URL)."""
    name = f"dlserve-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    docker(
        "run",
        "-d",
        "--name",
        name,
        "--read-only",
        "--tmpfs",
        "/tmp",
        "-p",
        f"127.0.0.1:{port}:3000",
        "-e",
        "DLSERVE_WORKERS=2",
        "-e",
        f"DLSERVE_DRAIN_DELAY_S={DRAIN_DELAY_S}",
        image,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            state = docker("inspect", "-f", "{{.State.Status}}", name)
            if state != "running" or time.monotonic() > deadline:
                raise AssertionError(f"not ready ({state}):\n{logs(name)}")
            time.sleep(0.5)
        yield name, url
    finally:
        docker("rm", "-f", name, check=False)


def test_the_image_runs_as_a_non_root_user_with_a_health_check(container: tuple[str, str]) -> None:
    name, _ = container
    config = json.loads(docker("image", "inspect", "-f", "{{json .Config}}", IMAGE))
    assert config["User"] == "bentoml"
    assert "3000/tcp" in config["ExposedPorts"]
    assert "/readyz" in " ".join(config["Healthcheck"]["Test"])
    assert docker("exec", name, "id", "-u") != "0"
    # Docker's own verdict, from the image's HEALTHCHECK (its first check is after 10 s).
    deadline = time.monotonic() + 60
    while (health := docker("inspect", "-f", "{{.State.Health.Status}}", name)) != "healthy":
        assert health == "starting" and time.monotonic() < deadline, health
        time.sleep(1)


def test_every_route_answers_a_valid_and_a_bad_request(container: tuple[str, str]) -> None:
    _, url = container
    with httpx.Client(base_url=url, timeout=30) as client:
        docs = client.get("/docs.json").json()
        cases, tags = route_cases(docs), docs["info"]["x-dlserve-models"]
        served = registry.serving(get_settings())
        protocol = {
            f"/v2/models/{name}{version}/infer"
            for name in served
            for version in ("", f"/versions/{tags[name].split(':')[1]}")
        }
        assert {c.path for c in cases} == protocol | {
            r.path for spec in served.values() for r in spec.routes
        }
        for case in cases:
            ok = post(client, case, case.valid)
            assert ok.status_code == 200, f"{case.path}: {ok.text[:500]}"
            answer = ok.json()
            assert answer.get("model", answer.get("model_name")).split(":")[0] == case.model
            bad = post(client, case, case.bad)
            assert bad.status_code == 400, f"{case.path}: {bad.text[:500]}"
            assert bad.json()["error"], case.path
        models = {m["tag"].split(":")[0]: m for m in client.get("/models").json()["models"]}
        assert models.keys() == served.keys()


def test_metrics_count_what_the_container_served(container: tuple[str, str]) -> None:
    _, url = container
    text = httpx.get(url + "/metrics", timeout=10).text
    for model in registry.serving(get_settings()):
        predicted = [
            line
            for line in text.splitlines()
            if line.startswith(f'dlserve_items_predicted_total{{model="{model}"}}')
        ]
        assert predicted and float(predicted[0].split()[-1]) > 0, model
        assert f'dlserve_model_ready{{model="{model}"}} 1.0' in text, model
    assert "bentoml_service_request_total" in text


def test_sigterm_drains_then_exits(container: tuple[str, str]) -> None:
    """Not ready at once, still serving during the drain delay, then a clean exit."""
    name, url = container
    case = route_cases(httpx.get(url + "/docs.json", timeout=10).json())[0]
    answers: list[int] = []
    stop = threading.Event()

    def keep_sending() -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            while not stop.is_set():
                try:
                    answers.append(post(client, case, case.valid).status_code)
                except httpx.TransportError:
                    return  # the server has stopped accepting: the drain delay is over

    sender = threading.Thread(target=keep_sending)
    sender.start()
    time.sleep(0.5)
    docker("kill", "--signal", "TERM", name)
    try:
        time.sleep(0.5)
        assert httpx.get(url + "/readyz", timeout=5).status_code == 503
        assert httpx.get(url + "/livez", timeout=5).status_code == 200
        exit_code = docker("wait", name, timeout=40)
    finally:
        stop.set()
        sender.join(timeout=30)
    assert exit_code == "0", logs(name)
    assert answers and set(answers) == {200}, answers
