"""Classification metrics for `dlserve eval`."""

from __future__ import annotations

from typing import Any

import numpy as np


def accuracy_report(predicted: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Overall accuracy and accuracy per class (classes present in `labels`), 4 decimals."""
    per_class = {
        name: round(float((predicted[labels == i] == i).mean()), 4)
        for i, name in enumerate(names)
        if (labels == i).any()
    }
    return {
        "accuracy": round(float((predicted == labels).mean()), 4),
        "per_class_accuracy": per_class,
    }
