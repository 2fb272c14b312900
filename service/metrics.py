"""dlserve's own Prometheus metrics, beside BentoML's `bentoml_service_*` ones on /metrics.

prometheus_client is imported only when the first worker builds these, because BentoML
sets PROMETHEUS_MULTIPROC_DIR in each worker after importing the service module; imported
earlier, the client would count in-process only and /metrics would miss other workers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

# Why a request was refused at once (dlserve_requests_shed_total's reason).
SHED_REASONS = ("deadline", "overloaded")
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class Metrics:
    inference_seconds: Any  # Histogram[model, provider]: one model run (one batch)
    batch_items: Any  # Histogram[model]: items per model run
    preprocess_seconds: Any  # Histogram[model]: request parsing and preprocessing
    items_predicted: Any  # Counter[model]
    errors: Any  # Counter[model, reason]
    model_info: Any  # Gauge[model, version, sha256, provider, precision] = 1
    queue_seconds: Any  # Histogram[model]: a request's wait in the batcher's queue
    model_ready: Any  # Gauge[model]: 1 once loaded and warmed up in every live worker
    worker_starts: Any  # Counter[worker]: worker processes started, by worker id
    abandoned: Any  # Counter[model, stage]: requests whose client hung up, by how far they got
    shed: Any  # Counter[model, reason]: requests refused at once: deadline or overloaded
    # The demand an autoscaler reads (docs/autoscaling.md), set by sample_demand
    requests_in_flight: Any  # Gauge: requests the pod's workers have in hand
    queued_items: Any  # Gauge[model]: items accepted by the model's batcher and not yet run
    # While a canary runs (service/repository.py): each version's requests and latency
    version_requests: Any  # Counter[model, version, status]: status "2xx", "4xx", "5xx"
    version_seconds: Any  # Histogram[model, version]: request to answer, in the worker
    # Payload logging (service/payload_log.py), when it is on
    payload_log_written: Any  # Counter: records written to the sink
    payload_log_dropped: Any  # Counter[reason]: queue_full, sink_error
    # What each model answers, and how far that has drifted (service/drift.py)
    predictions: Any  # Counter[model, version, class]: class, label or popularity band
    confidence: Any  # Counter[model, version, band]: the answer's probability, in bands
    drift: Any  # Gauge[model, signal]: recent mix vs the manifest's, total variation 0-1


@cache
def get_metrics() -> Metrics:
    from prometheus_client import Counter, Gauge, Histogram

    return Metrics(
        inference_seconds=Histogram(
            "dlserve_inference_seconds",
            "Time of one model run (one batch)",
            ["model", "provider"],
            buckets=LATENCY_BUCKETS,
        ),
        batch_items=Histogram(
            "dlserve_batch_items",
            "Items per model run (server-side batch size)",
            ["model"],
            buckets=BATCH_BUCKETS,
        ),
        preprocess_seconds=Histogram(
            "dlserve_preprocess_seconds",
            "Time to parse, validate and preprocess one request",
            ["model"],
            buckets=LATENCY_BUCKETS,
        ),
        items_predicted=Counter("dlserve_items_predicted", "Items predicted", ["model"]),
        errors=Counter(
            "dlserve_errors", "Requests refused or failed, by reason", ["model", "reason"]
        ),
        model_info=Gauge(
            "dlserve_model_info",
            "Loaded model: version, ONNX SHA-256, execution provider, precision",
            ["model", "version", "sha256", "provider", "precision"],
            multiprocess_mode="livemax",
        ),
        queue_seconds=Histogram(
            "dlserve_queue_seconds",
            "Time a request waits in its model's queue for a model run",
            ["model"],
            buckets=LATENCY_BUCKETS,
        ),
        # livemin: 0 while any live worker has not loaded the model.
        model_ready=Gauge(
            "dlserve_model_ready",
            "1 when the model is loaded and warmed up in every worker",
            ["model"],
            multiprocess_mode="livemin",
        ),
        # A worker that replaces a dead one gets the same id (circus reuses the lowest
        # free one), so a restart shows as that worker's count going from 1 to 2, while a
        # server starting up only adds series at 1: increase() > 0 means a restart.
        worker_starts=Counter(
            "dlserve_worker_starts", "Worker processes started, by worker id", ["worker"]
        ),
        # stage: preparing (input being checked), queued (withdrawn before any model run),
        # running (its model run finished; nothing more ran for it).
        abandoned=Counter(
            "dlserve_requests_abandoned",
            "Requests whose client hung up before the answer, "
            "by the stage they had reached; their queued work was dropped",
            ["model", "stage"],
        ),
        # reason: deadline (could not start its model run before its deadline), overloaded
        # (the model's queue was full).
        shed=Counter(
            "dlserve_requests_shed",
            "Requests refused at once with 503 + Retry-After rather than answered late",
            ["model", "reason"],
        ),
        # livesum: the pod's demand is the sum over its live workers; a worker that died
        # leaves the sum at once.
        requests_in_flight=Gauge(
            "dlserve_requests_in_flight",
            "Requests in hand (accepted, not yet answered), mean over the last second",
            multiprocess_mode="livesum",
        ),
        queued_items=Gauge(
            "dlserve_queued_items",
            "Items accepted by the model's batcher and not yet run, mean over the last second",
            ["model"],
            multiprocess_mode="livesum",
        ),
        version_requests=Counter(
            "dlserve_version_requests",
            "Requests answered by each version of a model while a canary runs, by status class",
            ["model", "version", "status"],
        ),
        version_seconds=Histogram(
            "dlserve_version_request_seconds",
            "Time from a request's arrival in the worker to its answer, by version, while a "
            "canary runs",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
        ),
        payload_log_written=Counter(
            "dlserve_payload_log_written", "Payload log records written to the log's sink"
        ),
        # reason: queue_full (the writer's queue was full: the sink is slower than the
        # traffic), sink_error (the file could not be written, or the URL not reached).
        payload_log_dropped=Counter(
            "dlserve_payload_log_dropped",
            "Payload log records dropped, by reason; the predictions were answered",
            ["reason"],
        ),
        # class: digits "0"-"9", sentiment's labels, the recommender's popularity bands
        # (head, torso, tail) of the movies it recommends; version: the model's version.
        predictions=Counter(
            "dlserve_predictions",
            "Items answered, by the class answered (the recommender: each recommended "
            "movie's popularity band)",
            ["model", "version", "class"],
        ),
        confidence=Counter(
            "dlserve_prediction_confidence",
            "Items answered, by the band of the answer's probability",
            ["model", "version", "band"],
        ),
        # Each worker measures its own traffic; livemax: the pod's most drifted worker.
        drift=Gauge(
            "dlserve_drift",
            "Total-variation distance (0-1) between the mix of a signal (class, confidence, "
            "input) over the worker's recent items and the training data's",
            ["model", "signal"],
            multiprocess_mode="livemax",
        ),
    )


# The demand gauges are copied from counts each worker keeps anyway (the guard's requests
# in hand, each batcher's items) by a thread of their own, never set per request: the
# request path pays nothing for them. Sampled every DEMAND_SAMPLE_S and published as the
# mean of the last DEMAND_SAMPLES samples: the requests in hand change with every request,
# and a scrape (every 15 s in deploy/k8s) should see the last second's level, not one
# instant's. One sample reads a few integers: microseconds, ten times a second.
DEMAND_SAMPLE_S = 0.1
DEMAND_SAMPLES = 10


@dataclass(frozen=True)
class Demand:
    """A worker's demand at one instant."""

    in_flight: int  # requests in hand
    queued: dict[str, int]  # items queued, by model (a model not served: absent)


def sample_demand(
    metrics: Metrics, models: Sequence[str], read: Callable[[], Demand]
) -> threading.Thread:
    """Start the thread that sets dlserve_requests_in_flight and dlserve_queued_items from
    `read()` (a model that `read` leaves out counts 0) for as long as the worker lives."""
    in_flight = metrics.requests_in_flight
    queued = {model: metrics.queued_items.labels(model=model) for model in models}

    def run() -> None:
        while True:
            samples = []
            for _ in range(DEMAND_SAMPLES):
                samples.append(read())
                time.sleep(DEMAND_SAMPLE_S)
            in_flight.set(sum(s.in_flight for s in samples) / DEMAND_SAMPLES)
            for model, gauge in queued.items():
                gauge.set(sum(s.queued.get(model, 0) for s in samples) / DEMAND_SAMPLES)

    thread = threading.Thread(target=run, name="dlserve-demand", daemon=True)
    thread.start()
    return thread
