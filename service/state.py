"""One worker's serving state: what the request path needs, and nothing of how it came to be.

The service class (service/app.py) builds one `WorkerState` when BentoML starts the worker,
fills it as its models load and flags it when the worker drains; the request path
(service/predict.py, protocol.py, info.py, pages.py and the guard) is handed this object
and never the service class, so that it depends on the state alone, not on the app that
declares the routes. Imports no torch.
"""

from __future__ import annotations

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import bentoml

from dlserve.manifest import Manifest
from dlserve.registry import ModelSpec
from dlserve.runners.base import Runner
from dlserve.settings import Settings
from service.batching import AdaptiveBatcher
from service.metrics import Metrics, get_metrics
from service.payload_log import PayloadLog, open_log


@dataclass(frozen=True)
class Serving:
    """One model version as this worker serves it; with a canary, the candidate version
    that answers `canary_percent` % of its requests (service/repository.py)."""

    runner: Runner[Any, Any]
    batcher: AdaptiveBatcher
    canary: Serving | None = None
    canary_percent: float = 0.0
    # While a canary runs, both versions count their requests by version (the children of
    # dlserve_version_requests_total and _seconds, looked up once); otherwise nothing.
    counted: VersionCounters | None = None

    @property
    def tag(self) -> str:
        return self.runner.tag

    def pick(self) -> Serving:
        """The version that answers one request: the canary for its share of them."""
        if self.canary is not None and random.random() * 100 < self.canary_percent:
            return self.canary
        return self


@dataclass(frozen=True)
class VersionCounters:
    """One version's request metrics (service/metrics.py), by status class."""

    requests: dict[str, Any]  # "2xx", "4xx", "5xx" → its counter child
    seconds: Any  # its histogram child

    @classmethod
    def of(cls, metrics: Metrics, model: str, version: str) -> VersionCounters:
        return cls(
            {
                status: metrics.version_requests.labels(model=model, version=version, status=status)
                for status in ("2xx", "4xx", "5xx")
            },
            metrics.version_seconds.labels(model=model, version=version),
        )

    def count(self, status: int, seconds: float) -> None:
        self.requests[f"{status // 100}xx" if status < 600 else "5xx"].inc()
        self.seconds.observe(seconds)


class WorkerState:
    """The worker's models (`runners`, each with its `batchers` entry, once loaded), its
    settings and metrics, and whether it is ready, draining, or cannot serve (`load_error`).
    Built in the worker: the metrics must be (service/metrics.py says why)."""

    def __init__(self, settings: Settings, specs: dict[str, ModelSpec]) -> None:
        self.settings = settings
        self.specs = specs
        self.metrics: Metrics = get_metrics()
        # Each model's child of the histogram, looked up once: labels() per request cost
        # about 1 % of a worker's time.
        self.preprocess_seconds: dict[str, Any] = {
            name: self.metrics.preprocess_seconds.labels(model=name) for name in specs
        }
        # Large bodies are parsed and preprocessed here, one at a time (service/predict.py).
        self.preparing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        # What requests asked and were answered (DLSERVE_PAYLOAD_LOG), or None: the guard
        # checks this one attribute per request (service/payload_log.py).
        self.payload_log: PayloadLog | None = open_log(settings, self.metrics)
        # Each loaded model's runner with its batcher, replaced as one (service/rollout.py):
        # a request takes both in one read, so it is prepared, run and answered by one
        # version even when another takes over meanwhile.
        self.serving: dict[str, Serving] = {}
        # What unloaded a model (POST .../unload), by model: its requests are told so.
        self.unloaded: dict[str, str] = {}
        # Models `dlserve serve` is still training beside the server (DLSERVE_STILL_TRAINING,
        # not in the store when the worker started): also in `unloaded`, and their requests
        # are told how far the training has got (service/predict.py).
        self.training: set[str] = set()
        # The manifest of each model's version at start-up: the contract (tensor names and
        # shapes, labels) that any version rolled out later must keep (service/rollout.py).
        self.contracts: dict[str, Manifest] = {}
        # Versions opened and checked by a load request in this worker, handed to its
        # rollout thread so that it does not open them again.
        self.candidates: dict[str, Runner[Any, Any]] = {}
        self.ready = False
        self.draining = False
        self.load_error: str | None = None

    @property
    def runners(self) -> dict[str, Runner[Any, Any]]:
        return {name: s.runner for name, s in self.serving.items()}

    @property
    def batchers(self) -> dict[str, AdaptiveBatcher]:
        return {name: s.batcher for name, s in self.serving.items()}

    async def wait_until_loaded(self) -> bool:
        """Whether the models are loaded, waiting up to half the request timeout for them.

        A worker that circus starts next to a serving one (after a crash) accepts
        connections before its models are loaded, and clients that reconnect land there
        too; waiting out the load (seconds) serves them instead of failing them. /readyz
        still says 503 meanwhile, so a load balancer sends no traffic to a server that has
        no ready worker at all."""
        deadline = time.monotonic() + self.settings.request_timeout_s / 2
        while not self.ready and self.load_error is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.ready


def current() -> WorkerState:
    """This worker's state, for the routes that are declared before any worker exists (the
    guard, and the routes mounted beside BentoML's): the one its service instance built."""
    state: WorkerState = bentoml.get_current_service().state
    return state
