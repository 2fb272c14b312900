"""train → export → eval through the real CLI, and what each stage leaves behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlserve import store
from dlserve.manifest import CONFIDENCE_BANDS, Manifest, ModelIntegrityError
from export.onnx_export import ExportSpec, ParityError, check_parity
from tests.conftest import ROOT, dlserve
from training.common import load_run, load_trained, run_paths
from training.digits import DigitsRun, build_model, example_inputs


def test_training_writes_checkpoint_config_metrics_and_curve(digits_model: str) -> None:
    paths = run_paths(Path(os.environ["DLSERVE_ARTIFACTS_DIR"]), "digits")
    state, run, metrics = load_run(paths, DigitsRun)  # weights_only=True inside
    assert set(state) >= {"c1.weight", "c3.weight", "c5.weight", "f6.weight", "output.weight"}
    assert state["c5.weight"].shape == (120, 16, 5, 5)
    assert run.architecture == "LeNet-5" and run.train_config.epochs == 4
    assert metrics["test_accuracy_torch"] > 0.95 and len(metrics["history"]["train loss"]) == 4
    assert paths.curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_stores_onnx_with_a_complete_manifest(digits_model: str) -> None:
    stored = store.load("digits")
    assert stored.tag == digits_model
    m = stored.manifest
    assert m.inputs[0].shape == ["batch", 1, 28, 28] and m.outputs[0].name == "logits"
    assert m.labels == [str(d) for d in range(10)] and m.opset >= 17
    assert m.preprocessing["mean"] == pytest.approx(0.1307)
    assert m.metrics["parity_max_abs_diff"] <= 1e-4
    assert "t10k-images-idx3-ubyte.gz" in m.training_data["files"]
    assert len(m.onnx_sha256) == 64


def test_export_prints_its_own_lines_and_stores_the_data_distribution(
    digits_model: str, tmp_path: Path
) -> None:
    """A second export of the trained model, into a store of its own: the parity checks and
    the summary, none of the exporter's graph-pass chatter or its torchvision warnings; and
    a manifest holding the data's distribution of each signal the service watches for drift."""
    out = dlserve("export", "digits", env={"BENTOML_HOME": str(tmp_path / "bentoml")})
    lines = out.stderr.splitlines()
    assert lines and all(line.startswith(("INFO export.", "INFO dlserve:")) for line in lines), (
        out.stderr[-3000:]
    )
    assert [line for line in lines if "parity digits" in line], lines
    (manifest,) = (tmp_path / "bentoml" / "models" / "digits").glob("*/manifest.json")
    found = Manifest.from_dict(json.loads(manifest.read_text())).distributions
    assert found["class"].bins == [str(d) for d in range(10)]
    assert found["confidence"].bins == CONFIDENCE_BANDS
    assert len(found["input"].edges) == len(found["input"].bins) - 1 >= 5  # ink deciles
    for signal in found.values():
        assert sum(signal.shares) == pytest.approx(1, abs=1e-4)
    assert found["class"].shares[1] > 0.1  # MNIST's most frequent digit, a little over 1/10
    assert found["confidence"].shares[-1] > 0.5  # mostly sure, on held-out images


def test_tampered_onnx_file_is_refused(digits_model: str) -> None:
    stored = store.load("digits")
    original = stored.onnx_path.read_bytes()
    try:
        stored.onnx_path.write_bytes(original[:-100])
        with pytest.raises(ModelIntegrityError, match="truncated or was altered"):
            store.load("digits")
    finally:
        stored.onnx_path.write_bytes(original)


def test_parity_check_reports_by_how_much_it_missed(digits_model: str) -> None:
    model, _, _ = load_trained(
        Path(os.environ["DLSERVE_ARTIFACTS_DIR"]), "digits", DigitsRun, build_model
    )
    with torch.no_grad():
        model.output.bias += 0.01  # the PyTorch model no longer matches the stored ONNX
    spec = ExportSpec(
        name="digits",
        task="",
        architecture="",
        inputs=[],
        outputs=[],
        preprocessing={},
        labels=[],
        assets={},
        metrics={},
        training_data={},
        example=example_inputs(2),
        parity_cases=[example_inputs(7)],
    )
    with pytest.raises(ParityError, match=r"differs from PyTorch by 1\.0\d*e-02"):
        check_parity(model, store.load("digits").onnx_path, spec)


def test_eval_json_prints_one_object_with_onnx_accuracy(digits_model: str) -> None:
    out = dlserve("eval", "digits", "--json").stdout
    metrics = json.loads(out)  # the whole of stdout is one JSON object
    assert metrics["model"] == digits_model and metrics["examples"] == 2000
    assert metrics["accuracy"] >= 0.97 and metrics["provider"] == "CPUExecutionProvider"
    # The same images as users send them (evaluation/digit_variants.py): the --quick model
    # learns no augmentation, so small and thin digits cost it accuracy.
    kinds = metrics["transformed_by_kind"]
    assert set(kinds) == {
        "rotation",
        "scale",
        "shift",
        "shear",
        "thickness",
        "blur",
        "contrast",
        "coarse",
        "noise",
    }
    assert 0.5 < metrics["transformed_accuracy"] < metrics["accuracy"]
    assert min(kinds.values()) < metrics["accuracy"] and all(0 < a <= 1 for a in kinds.values())


def test_eval_without_a_model_says_how_to_get_one(tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path)}
    cli = Path(sys.executable).with_name("dlserve")
    r = subprocess.run([str(cli), "eval", "digits"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "dlserve export digits" in r.stderr


def test_serving_code_imports_no_torch(
    digits_model: str, sentiment_model: str, recommender_model: str
) -> None:
    """The serving path (service module, model loading, a prediction) never loads torch,
    the training or export code, the data readers, evaluation or the bench."""
    code = (
        "import sys, numpy as np\n"
        "import service.app\n"
        "from dlserve.registry import load_runner\n"
        "from dlserve.settings import get_settings\n"
        "r = load_runner('digits', get_settings())\n"
        "r.warm_up(); r.predict(np.zeros((3, 28, 28), np.float32))\n"
        "s = load_runner('sentiment', get_settings())\n"
        "s.warm_up(); s.predict([s.encode('Fine.')])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in\n"
        "             ('torch', 'training', 'export', 'readers', 'evaluation', 'bench', 'cli'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=os.environ
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_a_manifest_of_another_format_is_refused(digits_model: str) -> None:
    stored = store.load("digits")
    path = stored.path / "manifest.json"
    original = path.read_text()
    try:
        path.write_text(original.replace('"format_version": 1', '"format_version": 2'))
        with pytest.raises(
            ModelIntegrityError,
            match="is manifest format 2, and this dlserve reads format 1; re-export",
        ):
            store.load("digits")
    finally:
        path.write_text(original)
