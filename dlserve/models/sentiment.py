"""sentiment: the sentiment of English text, an ensemble of BiLSTMs trained on SST-2."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dlserve.errors import InputError, PayloadTooLarge, check_item_list
from dlserve.prepared import Prepared
from dlserve.protocol import TensorDecl, Tensors
from dlserve.registry import DataSource, ModelSpec, PrecisionPlan, Ref, Route
from dlserve.runners.sentiment import SentimentRunner
from dlserve.settings import Settings

FIELD = "texts"


class SentimentRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "texts": ["A fast, funny, highly enjoyable movie.", "Dull and far too long."]
            }
        }
    )
    texts: list[str] = Field(
        description="English texts, any length (only the first tokens are read; see "
        "DLSERVE_MAX_TEXT_CHARS for the longest accepted)"
    )


class SentimentPrediction(BaseModel):
    label: str = Field(description="positive or negative")
    positive_probability: float


class SentimentResponse(BaseModel):
    model: str = Field(description="model tag, sentiment:<version>")
    predictions: list[SentimentPrediction]


def token_ids(
    runner: SentimentRunner, texts: list[str], *, max_items: int, max_chars: int, field: str = FIELD
) -> list[list[int]]:
    """Validate a list of texts → token ids per text; InputError names the culprit."""
    check_item_list(texts, field, expected="strings", noun="texts", max_items=max_items)
    out = []
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise PayloadTooLarge(
                f"{field}[{i}]: {len(text):,} characters is more than the "
                f"limit of {max_chars:,} per text"
            )
        ids = runner.encode(text)
        if not ids:
            raise InputError(
                f"{field}[{i}]: the text is empty or only whitespace; there is nothing to classify"
            )
        out.append(ids)
    return out


def prepare(runner: SentimentRunner, request: SentimentRequest, settings: Settings) -> Prepared:
    ids = token_ids(
        runner, request.texts, max_items=settings.max_items, max_chars=settings.max_text_chars
    )
    return Prepared(ids, len(ids))


def predictions(runner: SentimentRunner, probs: np.ndarray) -> list[SentimentPrediction]:
    positive = runner.labels.index("positive")
    return [
        SentimentPrediction(
            label=runner.labels[int(row.argmax())],
            positive_probability=round(float(row[positive]), 6),
        )
        for row in probs
    ]


def respond(runner: SentimentRunner, prepared: Prepared, probs: np.ndarray) -> SentimentResponse:
    return SentimentResponse(model=runner.tag, predictions=predictions(runner, probs))


def prepare_tensors(
    runner: SentimentRunner,
    inputs: dict[str, np.ndarray],
    parameters: dict[str, Any],
    settings: Settings,
) -> Prepared:
    """The protocol's `text`: BYTES [N], each element UTF-8 text."""
    texts = []
    for i, raw in enumerate(inputs["text"].ravel()):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise InputError(f"text[{i}]: not UTF-8 text") from None
    ids = token_ids(
        runner, texts, max_items=settings.max_items, max_chars=settings.max_text_chars, field="text"
    )
    return Prepared(ids, len(ids))


def tensor_outputs(
    runner: SentimentRunner, prepared: Prepared, probs: np.ndarray
) -> dict[str, np.ndarray]:
    labels = np.array([runner.labels[i].encode() for i in probs.argmax(axis=1)], dtype=object)
    return {
        "positive_probability": probs[:, runner.labels.index("positive")].astype(np.float32),
        "label": labels,
    }


def sst2(settings: Settings) -> DataSource:
    return DataSource(settings.data_dir, settings.sst2_url)


MODEL = ModelSpec(
    name="sentiment",
    task="text-classification",
    summary="binary sentiment of English text: three BiLSTMs trained on SST-2, averaged",
    runner=SentimentRunner,
    routes=(
        Route(
            "/sentiment/predict",
            "Classify English texts as positive or negative",
            SentimentResponse,
            prepare,
            respond,
            request=SentimentRequest,
        ),
    ),
    tensors=Tensors(
        inputs=(TensorDecl("text", ("BYTES",), (-1,)),),
        outputs=(
            TensorDecl("positive_probability", ("FP32",), (-1,)),
            TensorDecl("label", ("BYTES",), (-1,)),
        ),
        prepare=prepare_tensors,
        answer=tensor_outputs,
        example={
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [2],
                    "data": ["A fast, funny, highly enjoyable movie.", "Dull and far too long."],
                }
            ]
        },
    ),
    data=sst2,
    train=Ref("training.sentiment:train"),
    export=Ref("export.sentiment:export"),
    evaluate=Ref("evaluation.sentiment:evaluate"),
    workload=Ref("bench.workloads:SENTIMENT"),
    scoring=Ref("scoring.sentiment:SCORER"),
    # INT8 may cost at most 0.5 accuracy points on SST-2 dev; dynamic quantisation of the
    # LSTM's and the classifier's weights (ONNX Runtime's DynamicQuantizeLSTM, MatMulInteger).
    precision=PrecisionPlan(metric="accuracy", max_loss=0.005),
    train_minutes=12.0,  # about 12 minutes on 2 cores
)
