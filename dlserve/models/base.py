"""What every model runner has: its stored model, its session, and a batch-run method."""

from __future__ import annotations

from typing import Any, Self

import numpy as np

from dlserve.runtime import Session, create_session
from dlserve.settings import Settings
from dlserve.store import StoredModel, load


class Runner:
    name: str

    def __init__(self, stored: StoredModel, session: Session) -> None:
        self.stored = stored
        self.session = session

    @classmethod
    def load(cls, name: str, settings: Settings) -> Self:
        stored = load(name)
        session = create_session(
            stored.onnx_path, providers=settings.providers, threads=settings.ort_threads,
            cache_dir=stored.path / "trt-cache")
        return cls(stored, session)

    @property
    def tag(self) -> str:
        return self.stored.tag

    @property
    def provider(self) -> str:
        return self.session.provider

    def run_batch(self, parts: list[Any]) -> list[Any]:
        """Run several requests' worth of prepared inputs as one model call; one result each."""
        raise NotImplementedError

    def warm_up(self) -> None:
        """One run at a few batch sizes, so the first real request pays no lazy set-up."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What GET /models shows: the manifest's summary plus where and how it runs."""
        m = self.stored.manifest
        return {"name": self.name, "tag": self.tag, "sha256": m.onnx_sha256,
                "provider": self.provider, **m.summary(), "preprocessing": m.preprocessing,
                "created_at": m.created_at}


def accuracy_report(predicted: np.ndarray, labels: np.ndarray,
                    names: list[str]) -> dict[str, Any]:
    """Overall accuracy and accuracy per class (classes present in `labels`), 4 decimals."""
    per_class = {name: round(float((predicted[labels == i] == i).mean()), 4)
                 for i, name in enumerate(names) if (labels == i).any()}
    return {"accuracy": round(float((predicted == labels).mean()), 4),
            "per_class_accuracy": per_class}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def split_rows(array: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    return np.split(array, np.cumsum(counts)[:-1]) if counts else []
