"""The sentiment model through the real CLI: train → export → eval, and the contracts
between them (one tokenizer, padding that changes nothing, length buckets)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dlserve import store
from dlserve.models.sentiment import token_ids
from dlserve.preprocess.text import Vocabulary
from dlserve.registry import load_runner
from dlserve.runners.sentiment import length_buckets
from dlserve.settings import get_settings
from readers.sst2 import load_sst2
from tests.conftest import dlserve
from training.common import load_run, run_paths
from training.sentiment import SentimentRun


@pytest.fixture(scope="module")
def runner(sentiment_model: str):
    return load_runner("sentiment", get_settings())


def test_training_writes_checkpoint_vocabulary_metrics_and_curve(sentiment_model) -> None:
    paths = run_paths(Path(os.environ["DLSERVE_ARTIFACTS_DIR"]), "sentiment")
    state, run, metrics = load_run(paths, SentimentRun)  # weights_only=True inside
    vocab = run.vocabulary
    assert vocab["tokens"][:2] == ["<pad>", "<unk>"] and vocab["max_tokens"] == 256
    members = run.model_config.members
    for i in range(members):
        assert state[f"members.{i}.embed.weight"].shape == (len(vocab["tokens"]), 200)
        assert {
            f"members.{i}.forward_lstm.weight_ih_l0",
            f"members.{i}.backward_lstm.weight_ih_l0",
        } <= set(state)
    # The one-epoch --quick model scores 81.3 %; started at N(0, 1) instead of N(0, 0.1), its
    # word vectors held it to 74.3 % (training/sentiment.py, EMBED_INIT_STD).
    assert metrics["dev_accuracy_torch"] > 0.78 and metrics["best_epoch"] >= 1
    assert len(metrics["history"]["dev accuracy"]) == metrics["epochs_run"]
    assert paths.curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_manifest_carries_the_vocabulary_and_dynamic_axes(sentiment_model) -> None:
    m = store.load("sentiment").manifest
    assert m.inputs[0].name == "token_ids" and m.inputs[0].shape == ["batch", "tokens"]
    assert m.inputs[0].dtype == "int64" and m.labels == ["negative", "positive"]
    assert m.metrics["parity_max_abs_diff"] <= 1e-4
    assert m.assets["vocabulary"]["tokens"][:2] == ["<pad>", "<unk>"]
    assert set(m.training_data["files"]) == {"train.tsv", "dev.tsv"}


def test_training_and_serving_turn_text_into_the_same_ids(runner, data_dir: Path) -> None:
    """Training encodes with the vocabulary it built; serving with the one in the manifest."""
    _, run, _ = load_run(
        run_paths(Path(os.environ["DLSERVE_ARTIFACTS_DIR"]), "sentiment"), SentimentRun
    )
    trained = Vocabulary.from_json(run.vocabulary)
    texts = load_sst2(data_dir, "dev").texts + [
        "It's a charming, often affecting journey!",
        "Don't see it -- awful...",
        "😀 ok",
    ]
    served = token_ids(runner, texts, max_items=len(texts), max_chars=10_000)
    assert served == trained.encode_corpus(texts)


def test_onnx_prediction_ignores_padding(runner) -> None:
    ids = runner.encode("A fast, funny, highly enjoyable movie.")
    session = runner.session
    padded = [np.array([ids + [0] * extra], dtype=np.int64) for extra in (0, 1, 50, 300)]
    logits = [session.run({"token_ids": p})[0] for p in padded]
    assert all(np.allclose(lg, logits[0], atol=1e-6, rtol=0) for lg in logits)


def test_length_buckets_cover_every_text_once_and_split_wide_gaps() -> None:
    lengths = [3, 200, 4, 5, 180, 2, 3, 190]
    buckets = length_buckets(lengths)
    flat = np.concatenate(buckets)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    spans = [sorted(lengths[i] for i in b) for b in buckets]
    assert spans[0][:3] == [2, 3, 3]
    assert all(max(s) < min(t) for s, t in zip(spans, spans[1:], strict=False))
    assert not any(5 in s and 180 in s for s in spans)  # short texts never padded to 180
    assert len(length_buckets([10] * 64)) == 1 and len(length_buckets([7])) == 1


def test_eval_json_reports_dev_accuracy_through_onnx(sentiment_model) -> None:
    metrics = json.loads(dlserve("eval", "sentiment", "--json").stdout)
    assert metrics["model"] == sentiment_model and metrics["examples"] == 872
    assert metrics["split"] == "dev" and metrics["provider"] == "CPUExecutionProvider"
    assert metrics["accuracy"] > 0.78
    assert set(metrics["per_class_accuracy"]) == {"negative", "positive"}
