"""Export the trained BiLSTM: token ids in (dynamic batch and sequence axes), logits out.

Parity is checked at batch 1, 7 and 64 and at lengths 1, 17 and 200, each batch mixing
texts of different lengths (so padding is exercised), against PyTorch.
"""

from __future__ import annotations

from pathlib import Path

from dlserve.manifest import TensorSpec
from dlserve.store import StoredModel
from export.onnx_export import ExportSpec, export_and_publish
from training.common import load_trained
from training.sentiment import build_model, example_inputs

# (batch size, longest text): the other texts of each batch are shorter, down to 1 token.
PARITY_SHAPES = ((1, 1), (1, 17), (1, 200), (7, 17), (7, 200), (64, 1), (64, 17), (64, 200))


def _lengths(batch: int, longest: int) -> list[int]:
    """`batch` lengths spread from 1 to `longest` (all `longest` when batch is 1)."""
    if batch == 1:
        return [longest]
    return [max(1, round(1 + (longest - 1) * i / (batch - 1))) for i in range(batch)][::-1]


def export(artifacts_dir: Path) -> StoredModel:
    model, config, metrics = load_trained(artifacts_dir, "sentiment", build_model)
    vocab_size = config["model_config"]["vocab_size"]
    spec = ExportSpec(
        name="sentiment",
        task="text-classification",
        architecture=config["architecture"],
        inputs=[TensorSpec("token_ids", "int64", ["batch", "tokens"])],
        outputs=[TensorSpec("logits", "float32", ["batch", len(config["labels"])])],
        preprocessing={"kind": "tokenizer", "module": "dlserve.preprocess.text",
                       "pad_id": 0, "unk_id": 1, "padding": "after each text",
                       "max_tokens": config["vocabulary"]["max_tokens"],
                       "truncation": "first max_tokens tokens kept"},
        labels=config["labels"],
        assets={"vocabulary": config["vocabulary"]},
        metrics={k: v for k, v in metrics.items() if k != "history"},
        training_data=config["data"],
        example=example_inputs([5, 3], vocab_size),
        parity_cases=[example_inputs(_lengths(b, t), vocab_size, seed=b * 1000 + t)
                      for b, t in PARITY_SHAPES],
    )
    return export_and_publish(model, spec)
