"""Export a trained PyTorch model to ONNX, check it, prove parity, publish it to the store.

Every model goes through the same four steps:
1. `torch.onnx.export` (the dynamo exporter) with named, dynamic axes;
2. `onnx.checker` with full shape inference;
3. parity: ONNX Runtime against PyTorch on cases that differ from the export shapes,
   failing with a `ParityError` that says by how much (as optimum's exporter does);
4. a manifest, and a new version in BentoML's model store.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from dlserve.hashing import sha256_file
from dlserve.manifest import Distribution, Manifest, TensorSpec
from dlserve.runtime import create_session
from dlserve.store import StoredModel, publish
from readers.download import DataError

log = logging.getLogger(__name__)

OPSET = 18


class ParityError(AssertionError):
    """ONNX Runtime and PyTorch disagree by more than the tolerance."""


@dataclass(frozen=True)
class ExportSpec:
    """What the generic exporter needs to know about one model."""

    name: str
    task: str
    architecture: str
    inputs: list[TensorSpec]  # dynamic axes are the str entries of each shape
    outputs: list[TensorSpec]
    preprocessing: dict[str, Any]
    labels: list[str]
    assets: dict[str, Any]
    metrics: dict[str, Any]
    training_data: dict[str, Any]
    example: tuple[np.ndarray, ...]  # traced at export; inputs in the order of `inputs`
    parity_cases: list[tuple[np.ndarray, ...]]  # checked after; other shapes than `example`
    tolerance: float = 1e-4


def with_distribution(
    name: str, training_data: dict[str, Any], measure: Callable[[], dict[str, Distribution]]
) -> dict[str, Any]:
    """The manifest's `training_data`, with the distribution of each signal the service
    watches for drift (`Manifest.distributions`) that `measure` reads from the data the
    model was trained on; without it, and a warning, when that data cannot be read any
    more: the service then counts the model's answers but measures no drift for it."""
    try:
        measured = measure()
    except (OSError, DataError) as exc:
        log.warning("%s: no data distribution in the manifest, so no drift metric (%s)", name, exc)
        return training_data
    return {**training_data, "distribution": {k: asdict(d) for k, d in measured.items()}}


def _dynamic_shapes(inputs: Sequence[TensorSpec]) -> tuple[dict[int, Any], ...]:
    dims: dict[str, Any] = {}
    shapes = []
    for spec in inputs:
        axes = {}
        for i, d in enumerate(spec.shape):
            if isinstance(d, str):
                axes[i] = dims.setdefault(d, torch.export.Dim(d))
        shapes.append(axes)
    return tuple(shapes)


def export_onnx(model: torch.nn.Module, spec: ExportSpec, path: Path) -> None:
    example = tuple(torch.from_numpy(a) for a in spec.example)
    # The exporter's graph passes log every step at INFO (onnxscript: a line per node it
    # does not fold, hundreds for the LSTM); only their warnings matter here. Its operator
    # registry warns once per torchvision operator that torchvision is not installed:
    # these models use none.
    for chatty in ("onnx_ir", "onnxscript"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=(DeprecationWarning, FutureWarning))
        torch.onnx.export(
            model,
            example,
            str(path),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_shapes=_dynamic_shapes(spec.inputs),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,  # one self-contained file: its SHA-256 covers everything
            verbose=False,
        )


def check_parity(model: torch.nn.Module, onnx_path: Path, spec: ExportSpec) -> float:
    """Largest |ORT − PyTorch| over all parity cases; raises ParityError past tolerance."""
    session = create_session(onnx_path)  # parity is checked on the CPU
    worst = 0.0
    for case in spec.parity_cases:
        with torch.no_grad():
            expected = model(*(torch.from_numpy(a) for a in case))
        expected = expected if isinstance(expected, tuple) else (expected,)
        outputs = session.run(dict(zip(session.input_names, case, strict=True)))
        shapes = [a.shape for a in case]
        for name, got, want in zip(session.output_names, outputs, expected, strict=True):
            want = want.numpy()
            if got.shape != want.shape:
                raise ParityError(
                    f"{spec.name}: output {name} has shape {got.shape}, PyTorch "
                    f"{want.shape}, for input shapes {shapes}"
                )
            diff = float(np.max(np.abs(got - want))) if got.size else 0.0
            log.debug("parity %s %s inputs %s: max |diff| %.2e", spec.name, name, shapes, diff)
            if not diff <= spec.tolerance:
                raise ParityError(
                    f"{spec.name}: output {name} of ONNX Runtime differs from PyTorch by "
                    f"{diff:.3e} (> tolerance {spec.tolerance:.0e}) for input shapes {shapes}"
                )
            worst = max(worst, diff)
    # One line for the stage (each case's own at DEBUG).
    log.info(
        "parity %s: max |ONNX Runtime - PyTorch| %.2e over %d input shapes (tolerance %.0e)",
        spec.name,
        worst,
        len(spec.parity_cases),
        spec.tolerance,
    )
    return worst


class UnsupportedPrecision(ValueError):
    """A precision the PyTorch exporter does not build."""


def export_and_publish(
    model: torch.nn.Module, spec: ExportSpec, *, precision: str = "fp32"
) -> StoredModel:
    if precision != "fp32":
        # Variants are made from the stored fp32 version, checked here against PyTorch.
        raise UnsupportedPrecision(
            f"--precision {precision}: the PyTorch exporter builds fp32; the int8 and fp16 "
            "variants come from export.precision.export_variant (dlserve export --precision)"
        )
    model = model.eval().cpu()
    with tempfile.TemporaryDirectory(prefix=f"dlserve-export-{spec.name}-") as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, spec, path)
        onnx.checker.check_model(str(path), full_check=True)
        opset = next(
            o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")
        )
        max_diff = check_parity(model, path, spec)
        manifest = Manifest(
            name=spec.name,
            task=spec.task,
            architecture=spec.architecture,
            inputs=spec.inputs,
            outputs=spec.outputs,
            opset=opset,
            precision=precision,
            onnx_sha256=sha256_file(path),
            preprocessing=spec.preprocessing,
            labels=spec.labels,
            assets=spec.assets,
            metrics={**spec.metrics, "parity_max_abs_diff": max_diff},
            training_data=spec.training_data,
            versions={
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        return publish(manifest, path)
