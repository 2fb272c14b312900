"""Providers and precision end to end, through the real CLI and real servers: an INT8
variant exported, evaluated and served over HTTP when DLSERVE_PRECISION asks for it, while
a default server keeps loading FP32; DLSERVE_REQUIRE_GPU stopping start-up on a CPU
machine with a message that names the model and why."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dlserve import store
from tests.conftest import ROOT, dlserve, start_server
from tests.test_runtime import gpu_usable

DIGIT = {"images": [[[0] * 28] * 28]}
REQUESTS = {  # a valid request per model: (path, body)
    "digits": ("/digits/predict", DIGIT),
    "sentiment": ("/sentiment/predict", {"texts": ["A fast, funny, highly enjoyable movie."]}),
    "recommender": ("/recommender/recommend", {"ratings": [{"movie_id": 50, "rating": 5}], "k": 3}),
}


@pytest.fixture(scope="module")
def int8_models(
    digits_model: str,
    sentiment_model: str,
    recommender_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """INT8 variants of the three --quick models, exported through the CLI into a private
    copy of the model store (other test modules keep seeing only what they exported);
    yields their tags by model and the environment that points at that store. Digits must
    meet its tolerance; the other two --quick models, trained for seconds, are not what
    the tolerances are set for (`dlserve bench --only precision` measures the full models:
    BENCHMARKS.md)."""
    home = tmp_path_factory.mktemp("int8") / "bentoml"
    shutil.copytree(Path(os.environ["BENTOML_HOME"]) / "models", home / "models")
    env = {"BENTOML_HOME": str(home)}
    tags = {
        name: dlserve(
            "export",
            name,
            "--precision",
            "int8",
            *(() if name == "digits" else ("--allow-accuracy-loss",)),
            env=env,
        ).stdout.strip()
        for name in REQUESTS
    }
    yield tags, env


@pytest.fixture(scope="module")
def int8_digits(int8_models: tuple[dict[str, str], dict[str, str]]) -> tuple[str, dict[str, str]]:
    tags, env = int8_models
    return tags["digits"], env


def test_an_int8_export_is_a_version_of_its_own_and_eval_finds_it(
    digits_model: str, int8_digits: tuple[str, dict[str, str]]
) -> None:
    tag, env = int8_digits
    assert tag.startswith("digits:") and tag != digits_model
    int8 = json.loads(dlserve("eval", "digits", "--precision", "int8", "--json", env=env).stdout)
    fp32 = json.loads(dlserve("eval", "digits", "--json", env=env).stdout)
    assert int8["model"] == tag and fp32["model"] == digits_model  # the default stays fp32
    # The manifest records the precision and the check against the fp32 parent.
    manifest = json.loads(
        (
            Path(env["BENTOML_HOME"])
            / "models"
            / "digits"
            / tag.partition(":")[2]
            / "manifest.json"
        ).read_text()
    )
    check = manifest["metrics"]["precision_check"]
    assert manifest["precision"] == "int8" and check["parent"] == digits_model
    assert check["variant"] == int8["accuracy"] and check["fp32"] == fp32["accuracy"]
    assert check["loss"] <= check["tolerance"] == 0.003
    assert "static" in check["method"]


def test_export_refuses_a_variant_that_loses_too_much(
    digits_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process, with a tolerance no INT8 model can meet, so that the refusal is checked
    without a damaged model: nothing is stored, and the message says by how much."""
    from dataclasses import replace

    from dlserve import registry
    from dlserve.settings import load_settings
    from export.precision import AccuracyLoss, export_variant

    spec = registry.available()["digits"]
    strict = replace(spec, precision=replace(spec.precision, max_loss=-1.0))
    before = store.latest("digits", "int8")
    with pytest.raises(
        AccuracyLoss,
        match=r"digits int8: accuracy 0\.\d+ against 0\.\d+ for "
        rf"{digits_model}, a loss of -?0\.\d+, more than the tolerance of -1",
    ):
        export_variant(strict, load_settings(), "int8")
    assert store.latest("digits", "int8") == before


def test_a_model_without_declared_variants_is_refused_by_name() -> None:
    result = dlserve(
        "export",
        "mlp",
        "--precision",
        "int8",
        check=False,
        env={"DLSERVE_MODEL_MODULES": "tests.fourth_model", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2
    assert "--precision int8: model mlp declares no precision variants" in result.stderr


def test_the_service_serves_int8_when_told_and_fp32_by_default(
    digits_model: str,
    sentiment_model: str,
    recommender_model: str,
    int8_models: tuple[dict[str, str], dict[str, str]],
    tmp_path: Path,
) -> None:
    int8, env = int8_models
    fp32 = {"digits": digits_model, "sentiment": sentiment_model, "recommender": recommender_model}
    for precision, expected in (("int8", int8), ("fp32", fp32)):
        extra = {"DLSERVE_PRECISION": precision} if precision != "fp32" else {}
        (log_dir := tmp_path / precision).mkdir()
        with start_server(log_dir, DLSERVE_WORKERS="1", **env, **extra) as running:
            models = {m["name"]: m for m in httpx.get(running.url + "/models").json()["models"]}
            metrics = httpx.get(running.url + "/metrics").text
            for name, (path, body) in REQUESTS.items():
                assert models[name]["tag"] == expected[name]
                assert models[name]["precision"] == precision
                answer = httpx.post(running.url + path, json=body)
                assert answer.status_code == 200, answer.text
                assert answer.json()["model"] == expected[name]
                assert re.search(
                    rf'dlserve_model_info{{[^}}]*model="{name}"[^}}]*'
                    rf'precision="{precision}"',
                    metrics,
                ), metrics[-2000:]
            log = running.output()
        # One start-up line per model naming it, its tag, precision and provider.
        for name in REQUESTS:
            assert re.search(
                rf"{name}: {expected[name]} \({precision}\) on "
                "CPUExecutionProvider",
                log,
            ), log[-3000:]


def test_a_server_asked_for_a_precision_it_lacks_stops_naming_the_fix(
    digits_model: str,
    sentiment_model: str,
    recommender_model: str,
    int8_models: tuple[dict[str, str], dict[str, str]],
    tmp_path: Path,
) -> None:
    _, env = int8_models
    with start_server(tmp_path, ready=False, DLSERVE_PRECISION="fp16", **env) as running:
        running.process.wait(timeout=120)
        output = running.output()
    assert running.process.returncode not in (None, 0)
    assert (
        "model digits (fp16) is not in the model store; run `dlserve export digits "
        "--precision fp16`" in output
    ), output[-3000:]


@pytest.mark.skipif(gpu_usable(), reason="this machine has a working GPU")
def test_require_gpu_stops_start_up_on_a_cpu_machine_naming_the_model(
    digits_model: str, sentiment_model: str, recommender_model: str, tmp_path: Path
) -> None:
    with start_server(tmp_path, ready=False, DLSERVE_REQUIRE_GPU="true") as running:
        running.process.wait(timeout=120)
        output = running.output()
    assert running.process.returncode not in (None, 0)
    assert re.search(
        rf"dlserve: cannot start: {digits_model}: DLSERVE_REQUIRE_GPU=true but no "
        r"GPU execution provider works for it \(.*CUDAExecutionProvider: ",
        output,
    ), output[-3000:]
    assert "refusing to fall back to the CPU" in output
