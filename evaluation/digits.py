"""digits: accuracy on the MNIST test split."""

from __future__ import annotations

from typing import Any

import numpy as np

from dlserve.registry import DataSource
from dlserve.runners.digits import DigitsRunner
from evaluation import digit_variants
from evaluation.metrics import accuracy_report
from readers.mnist import load_mnist

CHUNK = 1000  # images per model run


def predicted(runner: DigitsRunner, images: np.ndarray) -> np.ndarray:
    """The class of each image, in model runs of CHUNK images."""
    probs = [runner.predict(images[i : i + CHUNK]) for i in range(0, len(images), CHUNK)]
    return np.concatenate(probs).argmax(axis=1)


def evaluate(runner: DigitsRunner, source: DataSource) -> dict[str, Any]:
    test = load_mnist(source.folder, "test", base_url=source.url)

    def accuracy_on(images: np.ndarray) -> float:
        return round(float((predicted(runner, images) == test.labels).mean()), 4)

    return {
        "model": runner.tag,
        "provider": runner.provider,
        "dataset": "MNIST",
        "split": "test",
        "examples": int(len(test.labels)),
        **accuracy_report(predicted(runner, test.images), test.labels, runner.manifest.labels),
        # The same images as users send them (evaluation/digit_variants.py, seeded)
        "transformed_accuracy": accuracy_on(digit_variants.mixed(test.images)),
        "transformed_by_kind": {
            kind: accuracy_on(digit_variants.one_kind(test.images, kind))
            for kind in digit_variants.KINDS
        },
        "data_files": test.files,
    }
