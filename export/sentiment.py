"""Export the trained BiLSTM: token ids in (dynamic batch and sequence axes), logits out.

Parity is checked at batch 1, 7 and 64 and at lengths 1, 17 and 200, each batch mixing
texts of different lengths (so padding is exercised), against PyTorch.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from dlserve.manifest import Distribution, TensorSpec
from dlserve.preprocess.text import PAD_ID, UNK_ID, Vocabulary
from dlserve.runners.sentiment import token_counts
from dlserve.store import StoredModel
from export.onnx_export import ExportSpec, export_and_publish, with_distribution
from readers.sst2 import load_sst2
from training.common import load_trained
from training.sentiment import (
    SentimentLSTM,
    SentimentRun,
    build_model,
    example_inputs,
    predict_probs,
)

# (batch size, longest text): the other texts of each batch are shorter, down to 1 token.
PARITY_SHAPES = ((1, 1), (1, 17), (1, 200), (7, 17), (7, 200), (64, 1), (64, 17), (64, 200))


def _lengths(batch: int, longest: int) -> list[int]:
    """`batch` lengths spread from 1 to `longest` (all `longest` when batch is 1)."""
    if batch == 1:
        return [longest]
    return [max(1, round(1 + (longest - 1) * i / (batch - 1))) for i in range(batch)][::-1]


def export(artifacts_dir: Path, *, precision: str = "fp32") -> StoredModel:
    model, run, metrics = load_trained(artifacts_dir, "sentiment", SentimentRun, build_model)
    vocab_size = run.model_config.vocab_size
    spec = ExportSpec(
        name="sentiment",
        task="text-classification",
        architecture=run.architecture,
        inputs=[TensorSpec("token_ids", "int64", ["batch", "tokens"])],
        outputs=[TensorSpec("logits", "float32", ["batch", len(run.labels)])],
        preprocessing={
            "kind": "tokenizer",
            "module": "dlserve.preprocess.text",
            "pad_id": PAD_ID,
            "unk_id": UNK_ID,
            "padding": "after each text",
            "max_tokens": run.vocabulary["max_tokens"],
            "truncation": "first max_tokens tokens kept",
        },
        labels=run.labels,
        assets={"vocabulary": run.vocabulary},
        metrics=metrics,
        training_data=with_distribution(
            "sentiment", asdict(run.data), lambda: distribution(model, run)
        ),
        example=example_inputs([5, 3], vocab_size),
        parity_cases=[
            example_inputs(_lengths(b, t), vocab_size, seed=b * 1000 + t) for b, t in PARITY_SHAPES
        ],
    )
    return export_and_publish(model, spec, precision=precision)


def distribution(model: SentimentLSTM, run: SentimentRun) -> dict[str, Distribution]:
    """What the service compares its traffic with (service/drift.py): the balance of the
    training labels, and the confidence and length of the held-out texts. Lengths come
    from the held-out sentences, not the training split: most of SST-2's training rows are
    phrases cut from its parse trees, far shorter than what a user sends."""
    folder = Path(run.data.dir)
    vocab = Vocabulary.from_json(run.vocabulary)
    train, dev = load_sst2(folder, "train"), load_sst2(folder, "dev")
    seqs = vocab.encode_corpus(dev.texts)
    confidence = predict_probs(model, seqs, torch.device("cpu")).max(axis=1)
    return {
        "class": Distribution.of_classes("training labels", run.labels, train.labels),
        "confidence": Distribution.of_confidence("answers on the held-out texts", confidence),
        "input": Distribution.of_quantiles("tokens read of each held-out text", token_counts(seqs)),
    }
