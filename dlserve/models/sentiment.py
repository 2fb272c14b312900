"""sentiment: the sentiment of English text, an ensemble of BiLSTMs trained on SST-2."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from dlserve.errors import InputError, PayloadTooLarge, check_item_list
from dlserve.registry import DataSource, ModelSpec, Prepared, Ref, Route
from dlserve.runners.sentiment import SentimentRunner
from dlserve.settings import Settings

FIELD = "texts"


class SentimentRequest(BaseModel):
    texts: list[str] = Field(
        description="English texts, any length (only the first tokens are read; see "
                    "DLSERVE_MAX_TEXT_CHARS for the longest accepted)")


class SentimentPrediction(BaseModel):
    label: str = Field(description="positive or negative")
    positive_probability: float


class SentimentResponse(BaseModel):
    model: str = Field(description="model tag, sentiment:<version>")
    predictions: list[SentimentPrediction]


def token_ids(runner: SentimentRunner, texts: list[str], *, max_items: int,
              max_chars: int) -> list[list[int]]:
    """Validate a list of texts → token ids per text; InputError names the culprit."""
    check_item_list(texts, FIELD, expected="strings", noun="texts", max_items=max_items)
    out = []
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise PayloadTooLarge(f"{FIELD}[{i}]: {len(text):,} characters is more than the "
                                  f"limit of {max_chars:,} per text")
        ids = runner.encode(text)
        if not ids:
            raise InputError(f"{FIELD}[{i}]: the text is empty or only whitespace; "
                             "there is nothing to classify")
        out.append(ids)
    return out


def prepare(runner: SentimentRunner, request: SentimentRequest, settings: Settings) -> Prepared:
    ids = token_ids(runner, request.texts, max_items=settings.max_items,
                    max_chars=settings.max_text_chars)
    return Prepared(ids, len(ids))


def predictions(runner: SentimentRunner, probs: np.ndarray) -> list[SentimentPrediction]:
    positive = runner.labels.index("positive")
    return [SentimentPrediction(label=runner.labels[int(row.argmax())],
                                positive_probability=round(float(row[positive]), 6))
            for row in probs]


def respond(runner: SentimentRunner, prepared: Prepared, probs: np.ndarray) -> SentimentResponse:
    return SentimentResponse(model=runner.tag, predictions=predictions(runner, probs))


def sst2(settings: Settings) -> DataSource:
    return DataSource(settings.data_dir, settings.sst2_url)


MODEL = ModelSpec(
    name="sentiment",
    task="text-classification",
    summary="binary sentiment of English text: three BiLSTMs trained on SST-2, averaged",
    runner=SentimentRunner,
    routes=(Route("/sentiment/predict", "Classify English texts as positive or negative",
                  SentimentResponse, prepare, respond, request=SentimentRequest),),
    data=sst2,
    train=Ref("training.sentiment:train"),
    export=Ref("export.sentiment:export"),
    evaluate=Ref("evaluation.sentiment:evaluate"),
    workload=Ref("bench.workloads:SENTIMENT"),
    scoring=Ref("scoring.sentiment:SCORER"),
)
