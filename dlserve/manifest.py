"""The model manifest: one JSON file beside each ONNX model in the model store.

It is the contract between export and serving: tensor names, shapes and dtypes,
preprocessing constants, labels (or vocabulary, or movie table), opset, the SHA-256 of
the ONNX file, training metrics and the data the model was trained on, with that data's
distribution (`Distribution`): what the service compares its traffic with (service/drift.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from dlserve.hashing import sha256_file

MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
FORMAT_VERSION = 1
# fp32: the exported model; int8 (CPUs) and fp16 (GPUs): variants made from it (export/precision.py)
Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
# A classifier's confidence (the probability of the class it answers) in bands: the
# service counts answers by band, and the manifest holds the held-out data's share of each.
# Finest near 1, where a trained model's answers crowd.
CONFIDENCE_EDGES = (0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
CONFIDENCE_BANDS = [f"{lo:g}-{hi:g}" for lo, hi in pairwise((0, *CONFIDENCE_EDGES, 1))]
# Quantile bins of an input statistic (text length, ink): deciles of the reference data.
INPUT_BINS = 10


class ModelIntegrityError(RuntimeError):
    """A stored model is missing, truncated or altered; the message names the file and fix."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32", "int64"
    shape: list[int | str]  # str entries are dynamic axes, e.g. "batch"


@dataclass(frozen=True)
class Distribution:
    """One signal's distribution over bins (the shares sum to 1), measured at export on the
    data named by `of`; service/drift.py compares recent traffic with it. A numeric signal
    has `edges`: bin i holds the values from edges[i - 1] (inclusive) to edges[i]."""

    of: str
    bins: list[str]
    shares: list[float]
    edges: list[float] = field(default_factory=list)

    def bin(self, values: np.ndarray) -> np.ndarray:
        """The bin of each value of a numeric signal."""
        return np.searchsorted(np.asarray(self.edges), values, side="right")

    @classmethod
    def of_classes(cls, of: str, names: list[str], classes: np.ndarray) -> Distribution:
        """The share of each class (an index into `names`) among `classes`."""
        return cls(of, list(names), _shares(classes, len(names)))

    @classmethod
    def of_values(
        cls, of: str, values: np.ndarray, edges: list[float], names: list[str] | None = None
    ) -> Distribution:
        """The share of `values` in each bin between `edges`, the bins named "<a", "a-b",
        ..., ">=z" unless `names` names them."""
        if names is None:
            bounds = [f"{e:g}" for e in edges]
            names = [f"<{bounds[0]}", *(f"{a}-{b}" for a, b in pairwise(bounds)), f">={bounds[-1]}"]
        edges = [float(e) for e in edges]
        return cls(of, names, _shares(cls(of, names, [], edges).bin(values), len(names)), edges)

    @classmethod
    def of_quantiles(cls, of: str, values: np.ndarray) -> Distribution:
        """`values` in INPUT_BINS bins between their own quantiles (fewer where they tie),
        each edge a value of theirs."""
        quantiles = np.quantile(values, np.arange(1, INPUT_BINS) / INPUT_BINS, method="higher")
        return cls.of_values(of, values, sorted({float(q) for q in quantiles}))

    @classmethod
    def of_confidence(cls, of: str, confidence: np.ndarray) -> Distribution:
        """Confidences in the CONFIDENCE_BANDS."""
        return cls.of_values(of, confidence, list(CONFIDENCE_EDGES), CONFIDENCE_BANDS)


def _shares(bins: np.ndarray, n: int) -> list[float]:
    counts = np.bincount(np.asarray(bins, dtype=np.int64), minlength=n)
    return [round(float(c), 6) for c in counts / max(counts.sum(), 1)]


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

    @property
    def distributions(self) -> dict[str, Distribution]:
        """The training data's distribution of each signal the service watches ("class",
        "confidence", "input"; export/ measures them), as `training_data["distribution"]`
        holds them; empty for a model exported before dlserve stored them."""
        raw = self.training_data.get("distribution", {})
        return {signal: Distribution(**d) for signal, d in raw.items()}

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
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or "format_version" not in raw:
            raise ValueError("no format_version")
        written = raw["format_version"]
        if written != FORMAT_VERSION:
            raise ModelIntegrityError(
                f"{path} is manifest format {written}, and this dlserve reads format "
                f"{FORMAT_VERSION}; re-export the model with this version (dlserve export)"
            )
        return Manifest.from_dict(raw)
    except FileNotFoundError:
        raise ModelIntegrityError(
            f"{path} is missing; re-export the model (dlserve export)"
        ) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelIntegrityError(
            f"{path} is not a valid dlserve manifest ({exc}); re-export the model"
        ) from exc


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
    check_external_data(path)
    return path


def _tensors(graph: Any) -> Iterator[Any]:
    """Every tensor in an ONNX graph that can hold weights, subgraphs (If, Loop) included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            yield from [attr.t, *attr.tensors]
            for sub in [attr.g, *attr.graphs]:
                yield from _tensors(sub)


def check_external_data(onnx_path: Path) -> None:
    """Refuse an ONNX file whose weights live in files outside its own folder.

    A tensor can name an external file to read its data from; ONNX Runtime would open
    whatever path it names ("../../etc/shadow", "/proc/self/environ"), so only plain file
    names inside the model's folder are allowed. dlserve's own exports keep every weight
    inside model.onnx, where the manifest's SHA-256 covers it.
    """
    import onnx

    folder = onnx_path.parent.resolve()
    model = onnx.load(str(onnx_path), load_external_data=False)
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
            raise ModelIntegrityError(
                f"{onnx_path}: tensor {tensor.name!r} reads its data from {location!r}, "
                f"outside the model's folder; refusing to load it. Re-export the model "
                "(dlserve export) with its weights inside the ONNX file."
            )
