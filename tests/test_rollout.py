"""Rolling out a model version without a restart (service/repository.py, rollout.py),
against a real server of 2 workers with model control on, a model store of its own holding
real versions of the digits model (one good, four broken in each way a version can be),
real load under way, and Triton's own client.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from bench.http import Server
from tests.conftest import ROOT, start_server

# Publishes versions of the store's digits model into another BENTOML_HOME: four that must
# be refused, then the original twice (the second as a retraining would give it).
PUBLISH = r"""
import json, shutil, sys, tempfile
from dataclasses import replace
from pathlib import Path
import numpy as np, onnx
from onnx import numpy_helper
import bentoml
from dlserve import store
from dlserve.hashing import sha256_file
from dlserve.manifest import MANIFEST_FILE, ONNX_FILE, read_manifest

source = Path(sys.argv[1])
manifest = read_manifest(source)
work = Path(tempfile.mkdtemp())

def publish(label, onnx_file, m):
    with bentoml.models.create("digits", labels={"framework": "onnx", "precision": "fp32"},
                               metadata=m.summary()) as model:
        shutil.copyfile(onnx_file, Path(model.path) / ONNX_FILE)
        (Path(model.path) / MANIFEST_FILE).write_text(m.to_json())
        print(label, model.tag)

original = source / ONNX_FILE
# the bytes altered after export: the manifest's checksum no longer matches
altered = work / "altered.onnx"
altered.write_bytes(original.read_bytes()[:-8] + b"\0" * 8)
publish("altered", altered, manifest)
# checksummed, but no ONNX model
garbage = work / "garbage.onnx"
garbage.write_bytes(b"not an onnx model" * 64)
publish("unloadable", garbage, replace(manifest, onnx_sha256=sha256_file(garbage)))
# another contract: nine labels
publish("contract", original, replace(manifest, labels=manifest.labels[:-1]))
# weights that trained to NaN
graph = onnx.load(original)
first = next(t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
first.CopyFrom(numpy_helper.from_array(
    np.full(numpy_helper.to_array(first).shape, np.nan, np.float32), first.name))
nan = work / "nan.onnx"
onnx.save(graph, nan)
publish("nan", nan, replace(manifest, onnx_sha256=sha256_file(nan)))
# last, so that the newest version, which a server starts on, is a good one
publish("original", original, manifest)
publish("retrained", original, manifest)
"""

CLIENTS = 32


def home_on(versions: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BENTOML_HOME of a server's own on the versions' model store: BentoML wipes the
    Prometheus files under its home when a server starts, so two servers must not share one."""
    home = tmp_path_factory.mktemp("home")
    (home / "models").symlink_to(Path(versions["home"]) / "models", target_is_directory=True)
    return home


@pytest.fixture(scope="module")
def versions(digits_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A BENTOML_HOME of its own, with the digits versions PUBLISH makes: label → tag."""
    home = tmp_path_factory.mktemp("rollout-home")
    source = subprocess.run(
        [
            sys.executable,
            "-c",
            "import bentoml, sys; print(bentoml.models.get(sys.argv[1]).path)",
            digits_model,
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout.strip()
    out = subprocess.run(
        [sys.executable, "-c", PUBLISH, source],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "BENTOML_HOME": str(home)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    tags = dict(line.split() for line in out.stdout.splitlines())
    tags["home"] = str(home)
    return tags


@pytest.fixture(scope="module")
def rollout_server(
    versions: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """Starts on the newest version, "retrained"."""
    with start_server(
        tmp_path_factory.mktemp("rollout"),
        BENTOML_HOME=str(home_on(versions, tmp_path_factory)),
        DLSERVE_MODELS="digits",
        DLSERVE_WORKERS="2",
        DLSERVE_MODEL_CONTROL="true",
    ) as running:
        yield running


def served_tags(url: str, n: int = 24) -> Counter[str]:
    """Which version answers, over `n` fresh connections (so both workers answer)."""
    image = np.zeros((28, 28), int).tolist()
    seen: Counter[str] = Counter()
    for _ in range(n):
        r = httpx.post(
            f"{url}/digits/predict",
            json={"images": [image]},
            headers={"Connection": "close"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        seen[r.json()["model"]] += 1
    return seen


def load(url: str, **parameters: object) -> httpx.Response:
    return httpx.post(
        f"{url}/v2/repository/models/digits/load", json={"parameters": parameters}, timeout=300
    )


class Traffic:
    """CLIENTS threads sending digits requests (JSON and image file) until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.statuses: Counter[int] = Counter()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(CLIENTS)]

    def _run(self, i: int) -> None:
        image = np.full((28, 28), i % 255).tolist()
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                r = client.post("/digits/predict", json={"images": [image]})
                self.statuses[r.status_code] += 1

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


@pytest.mark.exclusive  # 32 clients of load while versions switch
def test_a_rollout_and_a_rollback_under_load_answer_every_request(
    rollout_server: Server, versions: dict[str, str]
) -> None:
    start = set(served_tags(rollout_server.url))
    assert start == {versions["retrained"]}, start
    with Traffic(rollout_server.url) as traffic:
        r = load(rollout_server.url, version=versions["original"].split(":")[1])
        assert r.status_code == 200, r.text
        assert r.json()["version"] == versions["original"] and r.json()["workers"] == 2
        # As soon as the call returns, every worker answers with the new version.
        assert set(served_tags(rollout_server.url)) == {versions["original"]}
        back = load(rollout_server.url, rollback=True)
        assert back.status_code == 200, back.text
        assert set(served_tags(rollout_server.url)) == start
    assert sum(traffic.statuses.values()) > 100, traffic.statuses
    assert set(traffic.statuses) == {200}, traffic.statuses


@pytest.mark.parametrize(
    ("label", "status", "reason"),
    [
        ("altered", 422, "has SHA-256"),
        ("unloadable", 422, "cannot be read"),
        ("contract", 422, "does not match the contract"),
        ("nan", 422, "NaN or infinite"),
    ],
)
def test_a_bad_version_is_refused_with_its_reason_and_the_old_one_still_answers(
    rollout_server: Server, versions: dict[str, str], label: str, status: int, reason: str
) -> None:
    before = served_tags(rollout_server.url, 8)
    r = load(rollout_server.url, version=versions[label])
    assert r.status_code == status, r.text
    assert reason in r.json()["error"] and versions[label] in r.json()["error"]
    assert served_tags(rollout_server.url, 8).keys() == before.keys()


def test_names_that_are_no_version_are_client_errors(rollout_server: Server) -> None:
    r = load(rollout_server.url, version="digits:doesnotexist")
    assert r.status_code == 404 and "is not in the model store" in r.json()["error"], r.text
    r = load(rollout_server.url, version="sentiment:abc")
    assert r.status_code == 400 and "does not name a version of digits" in r.json()["error"]
    r = httpx.post(
        f"{rollout_server.url}/v2/repository/models/digits/load",
        content=b"{",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "not JSON" in r.json()["error"], r.text
    r = load(rollout_server.url, config="{}")
    assert r.status_code == 400 and "unsupported load parameter" in r.json()["error"]
    r = httpx.post(f"{rollout_server.url}/v2/repository/models/nosuch/load", json={})
    assert r.status_code == 404, r.text


def test_tritonclient_lists_loads_and_unloads(
    rollout_server: Server, versions: dict[str, str]
) -> None:
    client = triton.InferenceServerClient(rollout_server.url.removeprefix("http://"))
    index = client.get_model_repository_index()
    by_version = {e["version"]: e for e in index}
    for label in ("original", "retrained", "altered", "nan"):
        assert versions[label].split(":")[1] in by_version, (label, index)
    assert [e["state"] for e in index].count("READY") == 1
    client.unload_model("digits")
    assert not client.is_model_ready("digits")
    infer_input = triton.InferInput("pixels", [1, 28, 28], "FP32")
    infer_input.set_data_from_numpy(np.zeros((1, 28, 28), np.float32))
    with pytest.raises(InferenceServerException, match="has no available versions"):
        client.infer("digits", [infer_input])
    r = httpx.post(
        f"{rollout_server.url}/digits/predict", json={"images": [np.zeros((28, 28)).tolist()]}
    )
    assert r.status_code == 503 and "unloaded by POST" in r.json()["error"], r.text
    client.load_model("digits")  # the newest version of the precision
    assert client.is_model_ready("digits")
    assert set(served_tags(rollout_server.url, 8)) == {versions["retrained"]}
    client.close()


def test_model_control_is_off_by_default(client: httpx.Client) -> None:
    for path in ("/v2/repository/index", "/v2/repository/models/digits/load"):
        r = client.post(path, json={})
        assert r.status_code == 403 and "DLSERVE_MODEL_CONTROL" in r.json()["error"], r.text
    paths = client.get("/docs.json").json()["paths"]
    assert "/v2/repository/models/{name}/load" in paths


def test_a_switch_that_does_not_finish_in_time_puts_the_old_version_back_everywhere(
    versions: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    # 1 ms: the load looks at the workers' reports once at once, when no worker can have
    # switched yet (each looks for changes every 100 ms), and once 50 ms later: too late.
    with start_server(
        tmp_path_factory.mktemp("rollout-timeout"),
        BENTOML_HOME=str(home_on(versions, tmp_path_factory)),
        DLSERVE_MODELS="digits",
        DLSERVE_WORKERS="2",
        DLSERVE_MODEL_CONTROL="true",
        DLSERVE_ROLLOUT_TIMEOUT_S="0.001",
    ) as server:
        r = load(server.url, version=versions["original"])
        assert r.status_code == 503, r.text
        assert "did not switch within 0.001 s" in r.json()["error"], r.text
        assert f"{versions['retrained']} still serves" in r.json()["error"]
        deadline = time.monotonic() + 10  # the workers that did switch switch back
        while set(served_tags(server.url, 8)) != {versions["retrained"]}:
            assert time.monotonic() < deadline, served_tags(server.url, 8)
            time.sleep(0.2)


def dlserve(*args: str) -> subprocess.CompletedProcess[str]:
    """The real `dlserve` command line, as a person runs it."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def one_error_line(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 2 and not run.stdout, (run.returncode, run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlserve: error: "), run.stderr
    return lines[0]


def test_the_command_line_lists_rolls_out_and_rolls_back(
    rollout_server: Server, versions: dict[str, str]
) -> None:
    import json

    from bench.http import free_port

    url = rollout_server.url
    original, retrained = versions["original"], versions["retrained"]
    listed = dlserve("versions", "digits", "--json", "--url", url)
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    for label in ("original", "retrained", "altered", "nan"):
        assert versions[label].split(":")[1] in {e["version"] for e in entries}, label
    assert [e["version"] for e in entries if e["state"] == "READY"] == [retrained.split(":")[1]]

    out = dlserve("rollout", "digits", original.split(":")[1], "--url", url)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"digits: {retrained} → {original}, served by 2 workers\n"
    assert set(served_tags(url, 8)) == {original}
    rows = dlserve("versions", "digits", "--url", url)
    assert rows.returncode == 0, rows.stderr
    marked = {line.split()[0]: line.split()[1] for line in rows.stdout.splitlines()[1:]}
    assert marked["serving"] == original.split(":")[1], rows.stdout
    assert marked["previous"] == retrained.split(":")[1], rows.stdout

    back = dlserve("rollback", "digits", "--url", url)
    assert back.returncode == 0, back.stderr
    assert back.stdout == f"digits: {original} → {retrained}, served by 2 workers\n"
    assert set(served_tags(url, 8)) == {retrained}

    error = one_error_line(dlserve("rollout", "digits", "digits:nosuch", "--url", url))
    assert "HTTP 404" in error and "digits:nosuch" in error, error
    nowhere = f"http://127.0.0.1:{free_port()}"
    error = one_error_line(dlserve("versions", "digits", "--url", nowhere))
    assert nowhere in error and "no server answers" in error, error


def version_requests(url: str) -> dict[str, float]:
    """dlserve_version_requests_total by version (all statuses)."""
    totals: Counter[str] = Counter()
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("dlserve_version_requests_total{"):
            version = line.split('version="')[1].split('"')[0]
            totals[version] += float(line.rsplit(" ", 1)[1])
    return dict(totals)


def test_a_canary_answers_its_share_and_is_promoted_or_dropped_in_one_call(
    rollout_server: Server, versions: dict[str, str]
) -> None:
    url, stable, candidate = rollout_server.url, versions["retrained"], versions["original"]
    r = load(url, version=candidate, canary_percent=50)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == stable and r.json()["canary"] == candidate, r.text
    assert set(served_tags(url, 40)) == {stable, candidate}
    counted = version_requests(url)
    exported = httpx.get(f"{url}/metrics").text  # what the dashboard's canary panels read
    assert "dlserve_version_request_seconds_bucket{" in exported
    assert counted.get(stable.split(":")[1], 0) > 0 and counted.get(candidate.split(":")[1], 0) > 0
    states = {e["version"]: e for e in httpx.post(f"{url}/v2/repository/index", json={}).json()}
    assert states[candidate.split(":")[1]]["reason"] == "canary: 50 % of requests"
    # Rollback drops the canary; a load without a share promotes it.
    assert load(url, rollback=True).status_code == 200
    assert set(served_tags(url, 16)) == {stable}
    canary = dlserve("rollout", "digits", candidate, "--canary", "50", "--url", url)
    assert canary.returncode == 0, canary.stderr
    assert canary.stdout.strip() == (
        f"digits: {candidate} on 50 % of requests, {stable} on the rest, in 2 workers"
    )
    assert load(url, version=candidate).status_code == 200
    assert set(served_tags(url, 16)) == {candidate}
    for bad in (0, 100, "ten", True):
        r = load(url, version=stable, canary_percent=bad)
        assert r.status_code == 400 and "canary_percent" in r.json()["error"], (bad, r.text)
    r = load(url, version=candidate, canary_percent=10)  # the version that serves already
    assert r.status_code == 409, r.text
    assert load(url, version=stable).status_code == 200  # as the other tests expect it
    assert set(served_tags(url, 8)) == {stable}
