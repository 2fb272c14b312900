"""Export the trained LeNet-5: logits out, dynamic batch axis, parity at batch 1, 7, 64."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlserve.manifest import Distribution, Manifest, TensorSpec
from dlserve.preprocess.images import normalize
from dlserve.registry import DataSource
from dlserve.runners.digits import ink
from dlserve.store import StoredModel
from export.onnx_export import ExportSpec, export_and_publish, with_distribution
from readers.mnist import load_mnist
from training.common import load_trained
from training.digits import DigitsRun, LeNet5, build_model, example_inputs

PARITY_BATCHES = (1, 7, 64)
CALIBRATION_BATCH = 32


def export(artifacts_dir: Path, *, precision: str = "fp32") -> StoredModel:
    model, run, metrics = load_trained(artifacts_dir, "digits", DigitsRun, build_model)
    cfg = run.model_config
    spec = ExportSpec(
        name="digits",
        task="image-classification",
        architecture=run.architecture,
        inputs=[TensorSpec("pixels", "float32", ["batch", 1, 28, 28])],
        outputs=[TensorSpec("logits", "float32", ["batch", cfg.num_classes])],
        preprocessing={
            "kind": "mnist",
            "mean": cfg.mean,
            "std": cfg.std,
            "size": [28, 28],
            "ink": "bright on dark",
            "pixel_range": [0, 255],
        },
        labels=[str(d) for d in range(cfg.num_classes)],
        assets={},
        metrics=metrics,
        training_data=with_distribution(
            "digits", asdict(run.data), lambda: distribution(model, run)
        ),
        example=example_inputs(2),
        parity_cases=[example_inputs(b, seed=b) for b in PARITY_BATCHES],
    )
    return export_and_publish(model, spec, precision=precision)


def distribution(model: LeNet5, run: DigitsRun) -> dict[str, Distribution]:
    """What the service compares its traffic with (service/drift.py): the balance of the
    training labels, and the confidence and ink of the held-out images."""
    folder, cfg = Path(run.data.dir), run.model_config
    train, test = load_mnist(folder, "train"), load_mnist(folder, "test")
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(normalize(test.images, cfg.mean, cfg.std)))
    confidence = torch.softmax(logits, dim=-1).max(dim=-1).values.numpy()
    labels = [str(d) for d in range(cfg.num_classes)]
    return {
        "class": Distribution.of_classes("training labels", labels, train.labels),
        "confidence": Distribution.of_confidence("answers on the held-out images", confidence),
        "input": Distribution.of_quantiles(
            "ink (mean pixel intensity, 0-1) of the held-out images", ink(test.images)
        ),
    }


def calibration(manifest: Manifest, source: DataSource, n: int) -> list[dict[str, Any]]:
    """`n` training images, drawn at random and preprocessed as the runner does, in model
    input feeds: the activation ranges of the static INT8 variant (export/precision.py)."""
    train = load_mnist(source.folder, "train", base_url=source.url)
    rows = np.random.default_rng(0).choice(len(train.labels), n, replace=False)
    prep = manifest.preprocessing
    x = normalize(train.images[rows], prep["mean"], prep["std"])
    name = manifest.inputs[0].name
    return [{name: x[i : i + CALIBRATION_BATCH]} for i in range(0, n, CALIBRATION_BATCH)]
