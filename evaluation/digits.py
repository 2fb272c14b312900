"""digits: accuracy on the MNIST test split."""

from __future__ import annotations

from typing import Any

import numpy as np

from dlserve.registry import DataSource
from dlserve.runners.digits import DigitsRunner
from evaluation.metrics import accuracy_report
from readers.mnist import load_mnist

CHUNK = 1000  # images per model run


def evaluate(runner: DigitsRunner, source: DataSource) -> dict[str, Any]:
    test = load_mnist(source.folder, "test", base_url=source.url)
    probs = np.concatenate(
        [runner.predict(test.images[i : i + CHUNK]) for i in range(0, len(test.images), CHUNK)]
    )
    return {
        "model": runner.tag,
        "provider": runner.provider,
        "dataset": "MNIST",
        "split": "test",
        "examples": int(len(test.labels)),
        **accuracy_report(probs.argmax(axis=1), test.labels, runner.manifest.labels),
        "data_files": test.files,
    }
