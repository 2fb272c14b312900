"""The registry proven by a fourth model (tests/fourth_model.py, a small MLP on MNIST),
registered with DLSERVE_MODEL_MODULES and taken through the same commands as the built-in
three: train → export → eval → serve → bench, with no edit to the CLI, service or bench."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.http import Server
from tests.conftest import ROOT, dlserve, start_server

# A model module must be importable: from its installed package, or, as here, PYTHONPATH.
MODULES = {
    "DLSERVE_MODEL_MODULES": "tests.fourth_model",
    "DLSERVE_MODELS": "mlp",
    "PYTHONPATH": str(ROOT),
}


@pytest.fixture(scope="module")
def fourth(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[dict[str, str]]:
    """The fourth model trained and exported into a model store of its own."""
    root = tmp_path_factory.mktemp("fourth")
    env = {
        **MODULES,
        "BENTOML_HOME": str(root / "bentoml"),
        "DLSERVE_ARTIFACTS_DIR": str(root / "artifacts"),
    }
    metrics = json.loads(dlserve("train", "mlp", "--quick", env=env).stdout)
    assert metrics["epochs"] == 1
    env["TAG"] = dlserve("export", "mlp", env=env).stdout.strip()
    yield env


def test_the_cli_trains_exports_and_evaluates_it(fourth: dict[str, str]) -> None:
    assert fourth["TAG"].startswith("mlp:")
    metrics = json.loads(dlserve("eval", "mlp", "--json", env=fourth).stdout)
    assert metrics["model"] == fourth["TAG"] and metrics["examples"] == 2000
    assert metrics["accuracy"] > 0.85


def test_an_unregistered_model_is_refused_by_name() -> None:
    result = dlserve("train", "mlp", check=False)
    assert result.returncode == 2 and "invalid choice: 'mlp'" in result.stderr


@pytest.fixture(scope="module")
def server(fourth: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {k: v for k, v in fourth.items() if k != "TAG"}
    with start_server(
        tmp_path_factory.mktemp("fourth-server"), DLSERVE_WORKERS="1", **env
    ) as running:
        yield running


def test_the_service_serves_it_with_its_own_route_and_docs(
    server: Server, fourth: dict[str, str]
) -> None:
    digit = [[0] * 28] * 28
    r = httpx.post(server.url + "/mlp/predict", json={"images": [digit, digit]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == fourth["TAG"] and len(body["predictions"]) == 2
    bad = httpx.post(server.url + "/mlp/predict", json={"images": [[[0] * 27] * 28]})
    assert bad.status_code == 400 and "got shape (28, 27)" in bad.json()["error"]
    (model,) = httpx.get(server.url + "/models").json()["models"]
    assert model["name"] == "mlp" and model["inputs"][0]["shape"] == ["batch", 784]
    assert "/mlp/predict" in httpx.get(server.url + "/docs.json").json()["paths"]
    assert httpx.post(server.url + "/digits/predict", json={"images": [digit]}).status_code == 404


@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (make test installs it with apt-get)"
)
def test_the_bench_measures_it(
    fourth: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in fourth.items():
        if name != "TAG":
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("DLSERVE_WORKERS", "1")
    dlserve(
        "bench",
        "--out",
        str(tmp_path),
        "--hold-s",
        "1",
        "--short-s",
        "1",
        "--rounds",
        "1",
        "--skip",
        "profile,perf_analyzer,memory,burst",
    )
    results = json.loads((tmp_path / "benchmarks.json").read_text())
    sections = results["sections"]
    assert [c["model"] for c in sections["inprocess"]["ceiling"]] == ["mlp"]
    runs = sections["http"]["runs"]
    assert {r["model"] for r in runs} == {"mlp"}
    assert all(r["requests"] > 0 and r["non_2xx"] == 0 for r in runs), runs
    assert "mlp" in (tmp_path / "BENCHMARKS.md").read_text()
