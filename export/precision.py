"""Precision variants: `dlserve export MODEL --precision int8|fp16`.

A variant is made from the newest FP32 version in the model store (the one export checked
against PyTorch), so no PyTorch is needed and the reference is exactly its parent:
- int8, for CPUs, by ONNX Runtime's quantiser: "dynamic" (weights stored as INT8,
  activations quantised at run time; the LSTM's and the matrices' MatMuls) or "static"
  (activations too, with ranges calibrated on training inputs), as the model's registry
  entry says (`PrecisionPlan.int8`);
- fp16, for GPUs, by ONNX Runtime's float16 converter with inputs and outputs kept FP32,
  so clients see no difference.
The variant is evaluated beside its FP32 parent on the model's held-out data and refused
(`AccuracyLoss`) when it loses more than the registry entry's tolerance, unless the caller
allows it; otherwise it becomes a model-store version of its own, its precision in the
manifest and the comparison in its metrics.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
from onnxruntime.quantization import CalibrationDataReader

from dlserve import store
from dlserve.hashing import sha256_file
from dlserve.manifest import MANIFEST_FILE, ONNX_FILE, PRECISIONS
from dlserve.registry import Int8Method, ModelSpec, PrecisionPlan
from dlserve.settings import Settings
from dlserve.store import StoredModel

log = logging.getLogger(__name__)

CALIBRATION_ITEMS = 512  # training inputs that set the activation ranges of static INT8


class AccuracyLoss(ValueError):
    """A variant loses more than its model's tolerance against the FP32 version."""


class _Feeds(CalibrationDataReader):  # type: ignore[misc]
    """The calibration inputs, one feed at a time, as the static quantiser reads them."""

    def __init__(self, feeds: list[dict[str, Any]]) -> None:
        self._feeds: Iterator[dict[str, Any]] = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._feeds, None)


def _prepare(src: Path, dest: Path) -> Path:
    """`src` made ready for the quantiser (ONNX Runtime's `quant_pre_process`: constant
    folding and shape inference). The dynamo exporter feeds the LSTM weights it computes
    at run time (Unsqueeze of the initialisers); unfolded, the quantiser leaves the LSTM in
    FP32 and quantises only the classifier. Its shape annotations go first: they cover the
    weights too, and the Gemm weights the quantiser rewrites then fail ONNX shape inference
    ("Inferred shape and existing shape differ: (120) vs (84)")."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(src))
    del model.graph.value_info[:]
    bare = dest.with_suffix(".bare.onnx")
    onnx.save(model, str(bare))
    quant_pre_process(str(bare), str(dest), skip_symbolic_shape=True)
    return dest


def quantize_int8(
    src: Path, dest: Path, method: str, calibration: list[dict[str, Any]] | None = None
) -> None:
    """INT8 weights; with "static", INT8 activations too, as QDQ pairs whose ranges come
    from `calibration`. Dynamic scales are per tensor: per channel, the quantiser's scale
    for the RBM's MatMul has the wrong shape (onnx.checker: "Incompatible dimensions")."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    src = _prepare(src, dest.with_suffix(".fp32.onnx"))
    if method == "dynamic":
        quantize_dynamic(src, dest, weight_type=QuantType.QInt8)
    elif method == "static":
        if not calibration:
            raise ValueError("static INT8 needs calibration inputs")
        quantize_static(
            src,
            dest,
            _Feeds(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    else:
        raise ValueError(f"unknown INT8 method {method!r}; choose dynamic or static")


def convert_fp16(src: Path, dest: Path) -> None:
    """FP16 weights and arithmetic; inputs and outputs stay FP32 (Cast nodes at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    _sort_nodes(model.graph)
    onnx.save(model, str(dest))


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Put the nodes in topological order, as ONNX requires: the float16 converter appends
    the Cast nodes it adds for keep_io_types at the end of the graph."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        runnable = [n for n in pending if all(i in ready for i in n.input)]
        if not runnable:
            raise ValueError(f"{graph.name}: the graph has a cycle or a missing input")
        for node in runnable:
            ordered.append(node)
            ready.update(node.output)
        pending = [n for n in pending if n not in runnable]
    del graph.node[:]
    graph.node.extend(ordered)


def build(
    src: Path,
    dest: Path,
    precision: str,
    plan: PrecisionPlan,
    calibration: list[dict[str, Any]] | None = None,
) -> str:
    """Write the `precision` variant of `src` to `dest`; returns how it was made."""
    if precision == "int8":
        quantize_int8(src, dest, plan.int8, calibration)
        return f"onnxruntime.quantization, {plan.int8}"
    if precision == "fp16":
        convert_fp16(src, dest)
        return "onnxruntime.transformers.float16, inputs and outputs kept fp32"
    raise ValueError(f"--precision {precision}: choose from {', '.join(PRECISIONS)}")


def evaluate(spec: ModelSpec, stored: StoredModel, settings: Settings) -> dict[str, Any]:
    runner = spec.runner.open(stored, settings)
    return spec.evaluate.load()(runner, spec.data(settings))


def compare(
    plan: PrecisionPlan, reference: dict[str, Any], variant: dict[str, Any]
) -> dict[str, Any]:
    """The variant's metric beside its FP32 parent's, and the loss against the tolerance."""
    ref, got = float(reference[plan.metric]), float(variant[plan.metric])
    return {
        "metric": plan.metric,
        "fp32": ref,
        "variant": got,
        "loss": round(plan.loss(ref, got), 6),
        "tolerance": plan.max_loss,
    }


def export_variant(
    spec: ModelSpec,
    settings: Settings,
    precision: str,
    *,
    allow_accuracy_loss: bool = False,
    int8_method: Int8Method | None = None,
) -> StoredModel:
    """Build, check, evaluate and publish the `precision` variant of model `spec`;
    `int8_method` overrides the registry entry's INT8 method (to compare the two)."""
    plan = spec.precision
    if plan is None:
        raise ValueError(
            f"--precision {precision}: model {spec.name} declares no precision "
            "variants (its registry entry has no `precision`)"
        )
    if int8_method is not None:
        if int8_method == "static" and plan.calibration is None:
            raise ValueError(
                f"--int8-method static: model {spec.name} declares no calibration inputs"
            )
        plan = replace(plan, int8=int8_method)
    parent = store.load(spec.name, "fp32")
    calibration = None
    if precision == "int8" and plan.int8 == "static" and plan.calibration is not None:
        calibration = plan.calibration.load()(
            parent.manifest, spec.data(settings), CALIBRATION_ITEMS
        )
    with tempfile.TemporaryDirectory(prefix=f"dlserve-{precision}-{spec.name}-") as tmp:
        path = Path(tmp) / ONNX_FILE
        method = build(parent.onnx_path, path, precision, plan, calibration)
        onnx.checker.check_model(str(path), full_check=True)
        manifest = replace(
            parent.manifest,
            precision=precision,
            onnx_sha256=sha256_file(path),
            versions={**parent.manifest.versions, "onnxruntime": onnxruntime.__version__},
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        (Path(tmp) / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
        candidate = StoredModel(f"{spec.name}:{precision}-candidate", Path(tmp), manifest)
        check = compare(plan, evaluate(spec, parent, settings), evaluate(spec, candidate, settings))
        log.info(
            "%s %s (%s): %s %.4f against %.4f for %s (loss %.4f, tolerance %.4f)",
            spec.name,
            precision,
            method,
            plan.metric,
            check["variant"],
            check["fp32"],
            parent.tag,
            check["loss"],
            plan.max_loss,
        )
        if check["loss"] > plan.max_loss and not allow_accuracy_loss:
            raise AccuracyLoss(
                f"{spec.name} {precision}: {plan.metric} {check['variant']:.4f} against "
                f"{check['fp32']:.4f} for {parent.tag}, a loss of {check['loss']:.4f}, more "
                f"than the tolerance of {plan.max_loss:g}; not stored "
                "(--allow-accuracy-loss stores it anyway)"
            )
        metrics = {
            **parent.manifest.metrics,
            "precision_check": {
                **check,
                "parent": parent.tag,
                "method": method,
                "accepted": "within tolerance"
                if check["loss"] <= plan.max_loss
                else "--allow-accuracy-loss",
            },
        }
        return store.publish(replace(manifest, metrics=metrics), path)
