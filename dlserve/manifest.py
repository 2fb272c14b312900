"""The model manifest: one JSON file beside each ONNX model in the model store.

It is the contract between export and serving: tensor names, shapes and dtypes,
preprocessing constants, labels (or vocabulary, or movie table), opset, the SHA-256 of
the ONNX file, training metrics and the data the model was trained on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dlserve.hashing import sha256_file

MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
FORMAT_VERSION = 1


class ModelIntegrityError(RuntimeError):
    """A stored model is missing, truncated or altered; the message names the file and fix."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32", "int64"
    shape: list[int | str]  # str entries are dynamic axes, e.g. "batch"


@dataclass(frozen=True)
class Manifest:
    name: str
    task: str
    architecture: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    precision: str
    onnx_sha256: str
    preprocessing: dict[str, Any]
    labels: list[str] = field(default_factory=list)
    assets: dict[str, Any] = field(default_factory=dict)  # vocabulary, movie table, ...
    metrics: dict[str, Any] = field(default_factory=dict)
    training_data: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, ensure_ascii=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        raw = dict(raw)
        raw["inputs"] = [TensorSpec(**t) for t in raw["inputs"]]
        raw["outputs"] = [TensorSpec(**t) for t in raw["outputs"]]
        return cls(**raw)

    def summary(self) -> dict[str, Any]:
        """The small part that goes into BentoML's own model metadata and GET /models."""
        return {
            "task": self.task,
            "architecture": self.architecture,
            "onnx_sha256": self.onnx_sha256,
            "opset": self.opset,
            "precision": self.precision,
            "inputs": [asdict(t) for t in self.inputs],
            "outputs": [asdict(t) for t in self.outputs],
            "metrics": self.metrics,
        }


def read_manifest(model_dir: Path) -> Manifest:
    path = model_dir / MANIFEST_FILE
    try:
        return Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ModelIntegrityError(
            f"{path} is missing; re-export the model (dlserve export)") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelIntegrityError(
            f"{path} is not a valid dlserve manifest ({exc}); re-export the model") from exc


def verify_onnx(model_dir: Path, manifest: Manifest) -> Path:
    """The ONNX file's path, after checking it exists and matches the manifest's SHA-256."""
    path = model_dir / ONNX_FILE
    if not path.is_file():
        raise ModelIntegrityError(f"{path} is missing; re-export the model (dlserve export)")
    actual = sha256_file(path)
    if actual != manifest.onnx_sha256:
        raise ModelIntegrityError(
            f"{path} has SHA-256 {actual} but its manifest says {manifest.onnx_sha256}: "
            "the file is truncated or was altered. Re-export the model (dlserve export) "
            "or restore the original file."
        )
    return path
