"""The sentiment runner: texts in, positive/negative probabilities out.

Texts are tokenised by the one tokenizer (`dlserve.preprocess.text`) with the vocabulary
from the model's manifest. A batch mixes texts of very different lengths, and an LSTM's
cost grows with the padded length of its input, so `run_batch` sorts the texts by length
and runs them in length buckets (`length_buckets`) instead of padding all of them to the
longest one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

import numpy as np

from dlserve.data.sst2 import load_sst2
from dlserve.errors import InputError, PayloadTooLarge, check_item_list
from dlserve.models.base import Runner, accuracy_report, softmax, split_rows
from dlserve.preprocess.text import UNK_ID, Vocabulary, pad_batch
from dlserve.settings import Settings

FIELD = "texts"
# What one extra ONNX Runtime call costs, in token-steps of one text: on CPU the LSTM's cost
# is close to (texts × padded length) × ~45 µs, and a call's fixed cost is ~0.1 ms (measured
# with the default model; see BENCHMARKS.md).
RUN_OVERHEAD_TOKENS = 3


def length_buckets(lengths: list[int]) -> list[np.ndarray]:
    """Indices of the texts grouped into runs of similar length, shortest first.

    Going through the texts sorted by length, a new run starts when padding the current
    run's n texts up to the next text's length would cost more token-steps than a separate
    call does: (next length − current longest) × n > RUN_OVERHEAD_TOKENS.
    """
    order = np.argsort(lengths, kind="stable")
    buckets: list[np.ndarray] = []
    start = 0
    for i in range(1, len(order)):
        extra_padding = (lengths[order[i]] - lengths[order[i - 1]]) * (i - start)
        if extra_padding > RUN_OVERHEAD_TOKENS:
            buckets.append(order[start:i])
            start = i
    buckets.append(order[start:])
    return buckets


class SentimentRunner(Runner):
    name = "sentiment"

    @classmethod
    def load(cls, name: str, settings: Settings) -> Self:
        runner = super().load(name, settings)
        runner.vocab = Vocabulary.from_json(runner.stored.manifest.assets["vocabulary"])
        runner.labels = runner.stored.manifest.labels
        return runner

    def parse_texts(self, texts: list[Any], *, max_items: int, max_chars: int) -> list[list[int]]:
        """Validate a JSON list of texts → token ids per text; InputError names the culprit."""
        check_item_list(texts, FIELD, expected="strings", noun="texts", max_items=max_items)
        out = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"{FIELD}[{i}]: expected a string, got {type(text).__name__}")
            if len(text) > max_chars:
                raise PayloadTooLarge(f"{FIELD}[{i}]: {len(text):,} characters is more than the "
                                      f"limit of {max_chars:,} per text")
            ids = self.vocab.encode(text)
            if not ids:
                raise InputError(f"{FIELD}[{i}]: the text is empty or only whitespace; "
                                 "there is nothing to classify")
            out.append(ids)
        return out

    def predict(self, seqs: list[list[int]], *, bucketed: bool = True) -> np.ndarray:
        """Token-id lists → [N, 2] probabilities, one model run per length bucket (or one
        run padded to the longest text, for comparison)."""
        probs = np.empty((len(seqs), len(self.labels)), dtype=np.float32)
        lengths = [len(s) for s in seqs]
        buckets = length_buckets(lengths) if bucketed else [np.arange(len(seqs))]
        for bucket in buckets:
            ids = pad_batch([seqs[i] for i in bucket])
            (logits,) = self.session.run({self.session.input_names[0]: ids})
            probs[bucket] = softmax(logits)
        return probs

    def run_batch(self, parts: list[list[list[int]]]) -> list[np.ndarray]:
        probs = self.predict([seq for part in parts for seq in part])
        return split_rows(probs, [len(p) for p in parts])

    def warm_up(self) -> None:
        for n, length in ((1, 4), (8, 16), (64, 64)):
            self.predict([[UNK_ID] * length] * n)

    def format(self, probs: np.ndarray) -> list[dict[str, Any]]:
        positive = self.labels.index("positive")
        return [{"label": self.labels[int(row.argmax())],
                 "positive_probability": round(float(row[positive]), 6)} for row in probs]

    def evaluate(self, data_dir: Path, *, download_url: str | None = None) -> dict[str, Any]:
        dev = load_sst2(data_dir, "dev", url=download_url)
        predicted = self.predict(self.vocab.encode_corpus(dev.texts)).argmax(axis=1)
        return {
            "model": self.tag,
            "provider": self.provider,
            "dataset": "SST-2 (GLUE)",
            "split": "dev",
            "examples": len(dev.texts),
            **accuracy_report(predicted, dev.labels, self.labels),
            "data_files": dev.files,
        }
