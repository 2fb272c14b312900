"""dlserve models in BentoML's model store: `<name>:<version>` holding model.onnx and
manifest.json. Torch-free; used by export (write) and by serving and eval (read).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlserve.manifest import (
    MANIFEST_FILE,
    ONNX_FILE,
    Manifest,
    ModelIntegrityError,
    read_manifest,
    verify_onnx,
)


@dataclass(frozen=True)
class StoredModel:
    tag: str  # "digits:<version>"
    path: Path  # folder with model.onnx and manifest.json
    manifest: Manifest

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def version(self) -> str:
        return self.tag.partition(":")[2]


def publish(manifest: Manifest, onnx_file: Path) -> StoredModel:
    """Copy an exported, checked ONNX file and its manifest into the store as a new version."""
    import bentoml

    with bentoml.models.create(
        manifest.name,
        labels={"framework": "onnx", "task": manifest.task, "precision": manifest.precision},
        metadata=manifest.summary(),
    ) as model:
        dest = Path(model.path)
        shutil.copyfile(onnx_file, dest / ONNX_FILE)
        (dest / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
        tag = str(model.tag)
    return load(tag)


def _precision(model: Any) -> str:
    # Versions exported before precision variants existed are FP32 and say so only in
    # their metadata (the manifest summary), not in a label.
    return str(model.info.labels.get("precision") or model.info.metadata.get("precision", "fp32"))


def latest(name: str, precision: str = "fp32") -> str | None:
    """The tag of the newest version of `name` exported with `precision`, if any.

    BentoML's `name:latest` is the newest version whatever its precision, so an INT8
    export would silently replace the FP32 model everywhere; versions are filtered here."""
    return next((v.tag for v in versions(name) if v.precision == precision), None)


@dataclass(frozen=True)
class Version:
    """One version of a model in the store, as the model repository index lists it."""

    tag: str
    precision: str
    created_at: str  # ISO 8601
    metrics: dict[str, Any]  # the held-out metrics of its manifest summary

    @property
    def version(self) -> str:
        return self.tag.partition(":")[2]


def versions(name: str) -> list[Version]:
    """Every version of `name` in the store, newest first."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:  # BentoML raises NotFound, rather than listing nothing, when no version exists
        found = [m for m in bentoml.models.list(name) if m.tag.name == name]
    except NotFound:
        return []
    found.sort(key=lambda m: m.info.creation_time, reverse=True)
    return [
        Version(
            tag=str(m.tag),
            precision=_precision(m),
            created_at=m.info.creation_time.isoformat(),
            metrics=_metrics(m.info.metadata.get("metrics")),
        )
        for m in found
    ]


def _metrics(raw: Any) -> dict[str, Any]:
    return dict(raw) if isinstance(raw, dict) else {}


def exists(name: str, precision: str = "fp32") -> bool:
    return latest(name, precision) is not None


def load(tag: str, precision: str = "fp32") -> StoredModel:
    """Find a model and check it against its manifest: `name:version` is that version,
    a bare `name` the latest version exported with `precision`."""
    import bentoml
    from bentoml.exceptions import NotFound

    name = tag.partition(":")[0]
    found = tag if ":" in tag and not tag.endswith(":latest") else latest(name, precision)
    if found is None:
        flag = "" if precision == "fp32" else f" --precision {precision}"
        raise ModelIntegrityError(
            f"model {name} ({precision}) is not in the model store; run `dlserve export "
            f"{name}{flag}` (or, for fp32, `dlserve serve`, which trains and exports what is "
            "missing)"
        )
    try:
        model = bentoml.models.get(found)
    except NotFound:
        raise ModelIntegrityError(
            f"model {found} is not in the model store; run `dlserve export {name}` "
            "(or `dlserve serve`, which trains and exports what is missing)"
        ) from None
    path = Path(model.path)
    manifest = read_manifest(path)
    verify_onnx(path, manifest)
    return StoredModel(tag=str(model.tag), path=path, manifest=manifest)
