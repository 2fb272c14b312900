"""Prediction mix and drift: what each model answers, and how far that has moved from what
it answered (and was asked) on the data it was trained and evaluated on.

Each model run hands its runner's `observe` what it answered and was asked (`Seen`: each
item's class, confidence and input statistic, from arrays the run has anyway), and the
`Watch` of its version keeps it: a few microseconds a model run, and nothing of Prometheus
on the request path. A thread of each worker (`Mix.publish`), once a second, counts what
the watches kept by bin (numpy, over a second's worth of items at once) and:
- adds the counts to dlserve_predictions_total{model, version, class} and
  dlserve_prediction_confidence_total{model, version, band};
- adds them to each model's `Window` of each signal (about the last WINDOW_ITEMS items the
  worker answered) and sets dlserve_drift{model, signal} to the window's total-variation
  distance from the manifest's distribution of that signal (export/ measures it).

Total variation, half the sum of |recent share - reference share| over the bins, is the
share of recent items that would have to move to another bin for the mix to match the
reference: 0 to 1 whatever the number of bins, and defined for a bin the reference never
filled, where PSI and KL divergence divide by zero and grow without bound.

A model whose manifest has no distribution (exported before dlserve stored one) has its
answers counted but no drift series: there is nothing to compare with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from dlserve.manifest import CONFIDENCE_BANDS, CONFIDENCE_EDGES, Distribution
from dlserve.runners.base import Runner, Seen
from service.metrics import Metrics

log = logging.getLogger("dlserve.service")
# The signals compared with the manifest's distributions, as dlserve_drift's `signal`.
SIGNALS = ("class", "confidence", "input")
# The window: each item's weight shrinks by 1 - 1/WINDOW_ITEMS with every later item, so
# it holds about the last WINDOW_ITEMS items (its effective sample, 2 x WINDOW_ITEMS - 1).
# Held-out data in its natural mix kept every model's every signal under 0.04 of drift,
# and 640 images of one digit moved the digits class drift to 0.5 (tests/test_drift.py);
# traffic drawn from the reference itself stays under 0.08 by sampling noise alone.
WINDOW_ITEMS = 500
PUBLISH_S = 1.0
MAX_PENDING = 20_000  # model runs a Watch holds for the publisher (a second's worth)
CONFIDENCE = Distribution("confidence bands", CONFIDENCE_BANDS, [], list(CONFIDENCE_EDGES))


class Window:
    """A signal's recent distribution over the reference's bins, starting as the reference
    itself: drift 0 until traffic says otherwise, and moving as evidence comes in."""

    def __init__(self, reference: Distribution) -> None:
        self.reference = np.asarray(reference.shares, dtype=np.float64)
        self.weights = self.reference * WINDOW_ITEMS

    def add(self, counts: np.ndarray) -> None:
        """Items answered since the last call, counted by bin (as if answered at once)."""
        self.weights = self.weights * (1 - 1 / WINDOW_ITEMS) ** int(counts.sum()) + counts

    def drift(self) -> float:
        """Total-variation distance between the window's mix and the reference."""
        recent = self.weights / self.weights.sum()
        return float(np.abs(recent - self.reference).sum() / 2)


class Watch:
    """One served version's observer: its runner's `observe` is `pending.append`, so a
    model run pays for building its `Seen` and one append (digits: 8-11 us of CPU for a run
    of one image, most of it the ink, 25-34 us for 64; sentiment: 5-6 us; measured on the
    shared 2-core machine under load); the publisher bins and counts what is pending."""

    def __init__(self, runner: Runner[Any, Any], inputs: Distribution | None) -> None:
        self.model, self.version = runner.name, runner.stored.version
        self.classes = runner.classes
        self.inputs = inputs  # the model's reference of the input statistic, if any
        # At most a second's worth of model runs wait here; a publisher stalled for longer
        # loses the oldest rather than holding memory.
        self.pending: deque[Seen] = deque(maxlen=MAX_PENDING)

    def take(self) -> dict[str, np.ndarray]:
        """What the model runs since the last call answered, counted by bin, by signal."""
        seen = [self.pending.popleft() for _ in range(len(self.pending))]
        counts = {
            "class": _count([s.classes for s in seen], len(self.classes)),
            "confidence": _count([s.confidence for s in seen], len(CONFIDENCE.bins), CONFIDENCE),
        }
        if self.inputs is not None:
            counts["input"] = _count([s.inputs for s in seen], len(self.inputs.bins), self.inputs)
        return counts


def _count(
    values: list[np.ndarray | None], bins: int, numeric: Distribution | None = None
) -> np.ndarray:
    """How many of `values` (class indices, or values of a `numeric` signal) in each bin."""
    present = [v for v in values if v is not None]
    if not present:
        return np.zeros(bins, np.int64)
    joined = np.concatenate(present)
    return np.bincount(numeric.bin(joined) if numeric else joined, minlength=bins)


class Mix:
    """A worker's prediction mix: a Watch per version it serves, a Window per model and
    signal, and the thread that publishes both (`start`)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.watches: dict[str, Watch] = {}  # by tag
        self.references: dict[str, dict[str, Distribution]] = {}  # by model
        self.windows: dict[str, dict[str, Window]] = {}  # by model, then signal
        self.children: dict[tuple[str, ...], Any] = {}  # counter children, looked up once

    def watch(self, runner: Runner[Any, Any]) -> Watch:
        """Count what `runner` answers from now on. The first version of a model whose
        manifest has a distribution sets its reference (a rollout keeps the data set), and
        its drift series appear then, at 0."""
        model = runner.name
        if model not in self.references and (found := runner.manifest.distributions):
            self.references[model] = found
            self.windows[model] = {s: Window(found[s]) for s in SIGNALS if s in found}
            for signal in self.windows[model]:
                self.metrics.drift.labels(model=model, signal=signal).set(0)
        watch = Watch(runner, self.references.get(model, {}).get("input"))
        self.watches[runner.tag] = watch
        runner.observe = watch.pending.append
        return watch

    def publish(self) -> None:
        """Add what every version answered since the last call to the counters and the
        windows, and set the drift of each window that moved."""
        for watch in list(self.watches.values()):
            new = watch.take()
            self._count(watch, self.metrics.predictions, "class", watch.classes, new["class"])
            self._count(watch, self.metrics.confidence, "band", CONFIDENCE_BANDS, new["confidence"])
            for signal, window in self.windows.get(watch.model, {}).items():
                if signal in new and new[signal].any():
                    window.add(new[signal])
                    self.metrics.drift.labels(model=watch.model, signal=signal).set(window.drift())

    def _count(
        self, watch: Watch, counter: Any, label: str, names: list[str], counts: np.ndarray
    ) -> None:
        for i in np.flatnonzero(counts):
            key = (label, watch.model, watch.version, names[i])
            if (child := self.children.get(key)) is None:
                labels = {"model": watch.model, "version": watch.version, label: names[i]}
                child = self.children[key] = counter.labels(**labels)
            child.inc(int(counts[i]))

    def start(self) -> threading.Thread:
        """Publish every PUBLISH_S for as long as the worker lives."""

        def run() -> None:
            while True:
                time.sleep(PUBLISH_S)
                try:
                    self.publish()
                except Exception:  # noqa: BLE001 - the next second tries again
                    log.exception("publishing the prediction mix failed")

        thread = threading.Thread(target=run, name="dlserve-mix", daemon=True)
        thread.start()
        return thread
