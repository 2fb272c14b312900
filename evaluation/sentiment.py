"""sentiment: accuracy on SST-2 dev (GLUE keeps the test labels private)."""

from __future__ import annotations

from typing import Any

from dlserve.registry import DataSource
from dlserve.runners.sentiment import SentimentRunner
from evaluation.metrics import accuracy_report
from readers.sst2 import load_sst2


def evaluate(runner: SentimentRunner, source: DataSource) -> dict[str, Any]:
    dev = load_sst2(source.folder, "dev", url=source.url)
    predicted = runner.predict(runner.vocab.encode_corpus(dev.texts)).argmax(axis=1)
    return {
        "model": runner.tag,
        "provider": runner.provider,
        "dataset": "SST-2 (GLUE)",
        "split": "dev",
        "examples": len(dev.texts),
        **accuracy_report(predicted, dev.labels, runner.labels),
        "data_files": dev.files,
    }
