"""Prediction mix and drift, for real: a 2-worker server whose models' manifests carry
their training data's distribution counts every answer by class, confidence band and
popularity band, keeps dlserve_drift under the alert's threshold for held-out data in its
natural mix, and moves it past the threshold for a shifted stream (one digit only, long
texts, users who have rated every popular movie). The alert rule itself is tested by
promtool (tests/test_monitoring.py) and in a real Prometheus there."""

from __future__ import annotations

import base64
import importlib
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.http import Server
from dlserve import store
from dlserve.preprocess.ratings import Catalogue
from dlserve.runners.recommender import popularity_bands
from dlserve.settings import get_settings
from readers.mnist import load_mnist
from readers.movielens import load_movielens
from readers.sst2 import load_sst2
from tests.conftest import ROOT, start_server

MODELS = ("digits", "sentiment", "recommender")
# Each model's run config type in training/<model>.py, to rebuild it from its artefacts.
RUN_TYPES = {"digits": "DigitsRun", "sentiment": "SentimentRun", "recommender": "RecommenderRun"}
# What dlserve_drift watches of each model: the recommender answers with no confidence.
SIGNALS = {
    (model, signal)
    for model in MODELS
    for signal in ("class", "confidence", "input")
    if (model, signal) != ("recommender", "confidence")
}
BATCH = 64  # items per request


def alert_threshold() -> float:
    """The drift above which DlserveDrift fires (deploy/monitoring/alerts.yml)."""
    groups = yaml.safe_load((ROOT / "deploy" / "monitoring" / "alerts.yml").read_text())
    (rule,) = [r for g in groups["groups"] for r in g["rules"] if r["alert"] == "DlserveDrift"]
    match = re.search(r"dlserve_drift\b.*>\s*([0-9.]+)\s*$", rule["expr"], re.S)
    assert match, rule["expr"]
    return float(match[1])


def ensure_distribution(name: str) -> None:
    """The session store's latest version of `name` with its training data's distribution
    in its manifest. A model exported before dlserve stored one (a DLSERVE_TEST_CACHE from
    before) gets it measured here by export's own code, as `dlserve export` measures it."""
    stored = store.load(name)
    if stored.manifest.distributions:
        return
    from export.onnx_export import with_distribution
    from training.common import load_trained

    training = importlib.import_module(f"training.{name}")
    model, run, _ = load_trained(
        get_settings().artifacts_dir, name, getattr(training, RUN_TYPES[name]), training.build_model
    )
    measure = importlib.import_module(f"export.{name}").distribution
    data = with_distribution(name, stored.manifest.training_data, lambda: measure(model, run))
    manifest = replace(stored.manifest, training_data=data)
    # Written whole (a rename): a server starting meanwhile reads the old or the new.
    written = stored.path / "manifest.json.part"
    written.write_text(manifest.to_json(), encoding="utf-8")
    written.replace(stored.path / "manifest.json")


@pytest.fixture(scope="module")
def drift_server(
    digits_model: str,
    sentiment_model: str,
    recommender_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    for name in MODELS:
        ensure_distribution(name)
    with start_server(tmp_path_factory.mktemp("drift"), DLSERVE_WORKERS="2") as server:
        yield server


def samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every dlserve sample on /metrics, by name and labels."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("dlserve_")
    }


def drift(url: str) -> dict[tuple[str, str], float]:
    """dlserve_drift by (model, signal)."""
    return {
        (dict(labels)["model"], dict(labels)["signal"]): value
        for (name, labels), value in samples(url).items()
        if name == "dlserve_drift"
    }


def counted(url: str, name: str, label: str) -> dict[tuple[str, str], float]:
    """A prediction-mix counter summed over versions, by (model, its `label`)."""
    out: Counter[tuple[str, str]] = Counter()
    for (sample, labels), value in samples(url).items():
        if sample == name:
            out[(dict(labels)["model"], dict(labels)[label])] += value
    return dict(out)


def wait_for_counts(url: str, items: dict[str, int]) -> dict[tuple[str, str], float]:
    """dlserve_predictions_total by (model, class), once it holds `items` per model (the
    workers publish once a second)."""
    deadline = time.monotonic() + 15
    while True:
        classes = counted(url, "dlserve_predictions_total", "class")
        totals = {m: sum(v for (model, _), v in classes.items() if model == m) for m in items}
        if totals == items or time.monotonic() > deadline:
            assert totals == items, classes
            time.sleep(1.5)  # and the drift gauges, set after the counts
            return classes
        time.sleep(0.2)


def digits_requests(client: httpx.Client, images: np.ndarray) -> Counter[str]:
    """Classify `images` BATCH at a time; how many of each digit the answers said."""
    said: Counter[str] = Counter()
    for i in range(0, len(images), BATCH):
        batch = images[i : i + BATCH].astype(np.uint8)
        body = {"images_base64": [base64.b64encode(image.tobytes()).decode() for image in batch]}
        r = client.post("/digits/predict", json=body)
        assert r.status_code == 200, r.text
        said.update(str(p["digit"]) for p in r.json()["predictions"])
    return said


def sentiment_requests(client: httpx.Client, texts: list[str]) -> Counter[str]:
    said: Counter[str] = Counter()
    for i in range(0, len(texts), BATCH):
        r = client.post("/sentiment/predict", json={"texts": texts[i : i + BATCH]})
        assert r.status_code == 200, r.text
        said.update(p["label"] for p in r.json()["predictions"])
    return said


def recommend(client: httpx.Client, users: list[list[tuple[int, int]]]) -> int:
    """Ask for 10 recommendations for each user; how many movies were recommended."""
    recommended = 0
    for ratings in users:
        body = {"ratings": [{"movie_id": m, "rating": s} for m, s in ratings], "k": 10}
        r = client.post("/recommender/recommend", json=body)
        assert r.status_code == 200, r.text
        recommended += len(r.json()["recommendations"])
    return recommended


def test_drift_is_on_metrics_from_the_start(drift_server: Server) -> None:
    """Before any request, at 0: the windows start as the training data's distribution."""
    assert drift(drift_server.url) == dict.fromkeys(SIGNALS, 0.0)


def test_a_natural_stream_is_counted_and_stays_under_the_threshold(
    drift_server: Server, data_dir: Path
) -> None:
    """Held-out data in its natural mix: every answer counted in its class, and no signal
    of any model near the alert's threshold."""
    mnist = load_mnist(data_dir, "test").images
    dev = load_sst2(data_dir, "dev").texts
    movielens = load_movielens(data_dir / "ml-100k")
    users: dict[int, list[tuple[int, int]]] = {}
    for user, movie, level in zip(
        movielens.train.users, movielens.train.movies, movielens.train.levels, strict=True
    ):
        users.setdefault(int(user), []).append((int(movie), int(level)))
    with httpx.Client(base_url=drift_server.url, timeout=60) as client:
        digits = digits_requests(client, mnist)
        labels = sentiment_requests(client, dev)
        recommended = recommend(client, list(users.values())[:100])
    classes = wait_for_counts(
        drift_server.url,
        {"digits": len(mnist), "sentiment": len(dev), "recommender": recommended},
    )
    assert {c: v for (m, c), v in classes.items() if m == "digits"} == digits
    assert {c: v for (m, c), v in classes.items() if m == "sentiment"} == labels
    bands = counted(drift_server.url, "dlserve_prediction_confidence_total", "band")
    assert sum(v for (m, _), v in bands.items() if m == "digits") == len(mnist)
    assert not any(m == "recommender" for m, _ in bands)  # it has no confidence
    threshold = alert_threshold()
    measured = drift(drift_server.url)
    assert all(0 <= d < threshold / 2 for d in measured.values()), measured
    assert any(d > 0 for d in measured.values()), measured  # the windows did move


def test_a_shifted_stream_moves_drift_past_the_threshold(
    drift_server: Server, data_dir: Path
) -> None:
    """Images of one digit, texts far longer than the held-out ones, and users who have
    rated every popular movie (so that what is recommended comes from the torso and the
    tail): each moves its model's signal past the alert's threshold."""
    train = load_mnist(data_dir, "train")
    ones = train.images[train.labels == 1][: 10 * BATCH]
    dev = load_sst2(data_dir, "dev").texts
    long_texts = [" ".join(dev[i : i + 4]) for i in range(0, 8 * BATCH)]
    catalogue = Catalogue.from_json(store.load("recommender").manifest.assets["catalogue"])
    head = catalogue.movie_ids[popularity_bands(catalogue.popularity) == 0]
    fan = [(int(m), 5) for m in head]
    before = drift(drift_server.url)
    with httpx.Client(base_url=drift_server.url, timeout=60) as client:
        digits_requests(client, ones)
        sentiment_requests(client, long_texts)
        recommend(client, [fan] * 40)
    deadline = time.monotonic() + 15
    threshold = alert_threshold()
    shifted = [("digits", "class"), ("sentiment", "input"), ("recommender", "class")]
    while True:
        measured = drift(drift_server.url)
        if all(measured[s] > threshold for s in shifted) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(measured[s] > threshold > before[s] for s in shifted), (before, measured)
