"""Batch scoring for the sentiment model: a `text` column in, `label` and
`positive_probability` out, through `/sentiment/predict`'s checks (`token_ids`) and answer
(`predictions`); the texts of a payload log too (`REPLAY`: scoring/payloads.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from dlserve.models import sentiment
from dlserve.settings import Settings
from scoring.adapters import Job, Plan, Scored, check_each, reason
from scoring.formats import TableInput, detect, fingerprint, open_table, require_columns
from scoring.payloads import Replay, ReplayPart, json_field, paired, tensor

FIELDS = pa.schema([pa.field("label", pa.string()), pa.field("positive_probability", pa.float64())])


class TextPlan(Plan):
    """Scores a chunk's text column (`score`); its subclasses say where the rows come from."""

    fields = FIELDS

    def __init__(self, job: Job, settings: Settings, text: str) -> None:
        self.job, self.settings, self.text = job, settings, text

    def score(self, runner: Any, chunk: pa.Table) -> Scored:
        texts = chunk.column(self.text).to_pylist()
        rejects = [(i, f"{self.text}: missing") for i, t in enumerate(texts) if t is None]
        present = [i for i, t in enumerate(texts) if t is not None]
        limits = {"max_chars": self.settings.max_text_chars}
        ok, bad, ids = check_each(
            [texts[i] for i in present],
            lambda xs: sentiment.token_ids(runner, xs, max_items=max(1, len(xs)), **limits),
            lambda exc: reason(exc, "texts", self.text),
        )
        good = [present[i] for i in ok]
        rejects = sorted(rejects + [(present[i], r) for i, r in bad])
        step = self.job.batch_size
        answers = [
            p
            for i in range(0, len(good), step)
            for p in sentiment.predictions(runner, runner.run_batch([ids[i : i + step]])[0])
        ]
        return Scored(
            np.asarray(good, np.int64),
            {
                "label": pa.array([a.label for a in answers], pa.string()),
                "positive_probability": pa.array(
                    [a.positive_probability for a in answers], pa.float64()
                ),
            },
            rejects,
        )


class SentimentPlan(TextPlan):
    """A table with a text column."""

    def __init__(self, job: Job, settings: Settings) -> None:
        super().__init__(job, settings, job.columns.get("text", "text"))
        fmt = detect(job.input, job.input_format)
        # Read the text column as strings even where every value looks like a number.
        self.table = open_table(job.input, fmt, types={self.text: pa.string()})
        self.id_column = job.id_column or "id"
        require_columns(
            self.table,
            {"id": self.id_column, "text": self.text},
            "Sentiment reads a `text` column (--column text=NAME for another "
            "name); the id column is `id` unless --id-column says otherwise.",
        )
        self.id_type = self.table.schema.field(self.id_column).type
        self.rows = self.table.rows

    def identity(self) -> dict[str, Any]:
        return {
            "input": fingerprint(self.table.path),
            "format": self.table.format,
            "id": self.id_column,
            "column": self.text,
        }

    def chunks(self, chunk_rows: int) -> Iterator[pa.Table]:
        return self.table.chunks([self.id_column, self.text], chunk_rows)

    def ray_source(self) -> tuple[TableInput, list[str], str | None]:
        return self.table, [self.id_column, self.text], None


class SentimentReplay(ReplayPart, TextPlan):
    """The rows of a replayed payload log (scoring/payloads.py)."""

    id_column = "id"
    id_type = pa.string()


def _logged_inputs(inputs: Any) -> list[dict[str, Any]] | None:
    texts = json_field(inputs, "texts")
    if texts is None:
        texts = tensor(json_field(inputs, "inputs"), "text")
    return None if texts is None else [{"text": t} for t in texts]


def _logged_answers(outputs: Any) -> list[dict[str, Any]] | None:
    predictions = json_field(outputs, "predictions")
    if predictions is not None:
        return [{k: p[k] for k in ("label", "positive_probability")} for p in predictions]
    tensors = json_field(outputs, "outputs")
    labels, positive = tensor(tensors, "label"), tensor(tensors, "positive_probability")
    if labels is None or positive is None:
        return None
    return [
        {"label": label, "positive_probability": round(float(p), 6)}
        for label, p in zip(labels, positive, strict=True)
    ]


def _label_confidence(answers: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    positive = answers.column("positive_probability").to_numpy(zero_copy_only=False)
    labels = answers.column("label").to_numpy(zero_copy_only=False)
    return labels, np.maximum(positive, 1 - positive)


REPLAY = Replay(
    columns=pa.schema([pa.field("text", pa.string())]),
    unpack=lambda route, inputs, outputs: paired(_logged_inputs(inputs), _logged_answers(outputs)),
    plans=lambda job, settings: {"text": SentimentReplay(job, settings, "text")},
    label_confidence=_label_confidence,
    fields=FIELDS,
)


class SentimentScorer:
    replay = REPLAY

    def plan(self, job: Job, settings: Settings) -> Plan:
        return SentimentPlan(job, settings)


SCORER = SentimentScorer()
