"""What every runner has: its stored model, its ONNX Runtime session, and a batch function.

A runner is arrays in, arrays out: `run_batch` takes several requests' worth of prepared
inputs ("parts") and runs them as one model call, one result per part. What a request
looks like, and how an answer is written, is the model's contract (dlserve/models/).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Self, TypeVar

import numpy as np

from dlserve.manifest import Manifest
from dlserve.providers import TENSORRT
from dlserve.runtime import Session, create_session, session_config, warm_up_profile
from dlserve.settings import Settings
from dlserve.store import StoredModel, load

log = logging.getLogger("dlserve.runners")
Part = TypeVar("Part")  # one request's prepared input: an array, a list of token ids, ...
Result = TypeVar("Result")  # one part's output


@dataclass(frozen=True)
class Seen:
    """What a model run answered and was asked, one entry per item, for the service's
    prediction-mix metrics and drift (service/drift.py); None where a model has no such
    signal."""

    classes: np.ndarray | None = None  # index into the runner's `classes`
    confidence: np.ndarray | None = None  # the probability of the class answered
    inputs: np.ndarray | None = None  # the input statistic (manifest: distributions["input"])


class Runner(Generic[Part, Result]):
    # Told what each model run answered, where the service watches the mix (service/drift.py);
    # None elsewhere (batch scoring, evaluation, export): nothing is computed for it then.
    observe: Callable[[Seen], None] | None = None
    # The most one model run may cost, in the measure `item_costs` gives (None: a run is
    # bounded by DLSERVE_MAX_BATCH_SIZE items alone); the batcher splits requests by it.
    run_budget: int | None = None

    def __init__(self, stored: StoredModel, session: Session) -> None:
        self.stored = stored
        self.session = session

    @classmethod
    def load(cls, name: str, settings: Settings) -> Self:
        """Model `name` (its latest version of DLSERVE_PRECISION) or `name:version`, opened
        on the best execution provider the settings allow."""
        return cls.open(load(name, settings.precision), settings)

    @classmethod
    def open(cls, stored: StoredModel, settings: Settings) -> Self:
        m = stored.manifest
        config = session_config(
            settings, m.inputs, m.preprocessing, default_cache_dir=stored.path / "trt-cache"
        )
        session = create_session(stored.onnx_path, label=stored.tag, config=config)
        if session.provider == TENSORRT:  # engines are built per shape range, on first use
            warm_up_profile(session, config.profile, {t.name: t.dtype for t in m.inputs})
        log.info(
            "%s: %s (%s) on %s, %d CPU thread(s)",
            m.name,
            stored.tag,
            m.precision,
            session.provider,
            config.threads,
        )
        return cls(stored, session)

    @property
    def name(self) -> str:
        return self.stored.manifest.name

    @property
    def tag(self) -> str:
        return self.stored.tag

    @property
    def manifest(self) -> Manifest:
        return self.stored.manifest

    @property
    def provider(self) -> str:
        return self.session.provider

    @property
    def classes(self) -> list[str]:
        """What the model answers, as its prediction-mix metrics name it: the labels."""
        return self.manifest.labels

    def run_batch(self, parts: list[Part]) -> list[Result]:
        """Run several requests' worth of prepared inputs as one model call; one result each."""
        raise NotImplementedError

    def warm_up(self) -> list[Any]:
        """One run at a few batch sizes, so the first real request pays no lazy set-up;
        the outputs, which a new version's smoke test checks (service/rollout.py)."""
        raise NotImplementedError

    def item_costs(self, part: Part) -> list[int]:
        """What each item of a part costs a model run, in the measure of `run_budget`."""
        raise NotImplementedError

    def join(self, results: list[Result]) -> Result:
        """The results of one request's chunks (each a slice of its part, run in turn to
        bound a model run's size: service/batching.py), as the result of the whole."""
        return np.concatenate(results)  # type: ignore[arg-type, return-value]

    def describe(self) -> dict[str, Any]:
        """What GET /models shows: the manifest's summary plus where and how it runs."""
        m = self.manifest
        return {
            "name": self.name,
            "tag": self.tag,
            "sha256": m.onnx_sha256,
            "provider": self.provider,
            **m.summary(),
            "preprocessing": m.preprocessing,
            "created_at": m.created_at,
        }


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    probabilities: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return probabilities


def split_rows(array: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    return np.split(array, np.cumsum(counts)[:-1]) if counts else []
