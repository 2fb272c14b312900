"""dlserve models in BentoML's model store: `<name>:<version>` holding model.onnx and
manifest.json. Torch-free; used by export (write) and by serving and eval (read).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

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
        labels={"framework": "onnx", "task": manifest.task},
        metadata=manifest.summary(),
    ) as model:
        dest = Path(model.path)
        shutil.copyfile(onnx_file, dest / ONNX_FILE)
        (dest / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
        tag = str(model.tag)
    return load(tag)


def exists(name: str) -> bool:
    import bentoml
    from bentoml.exceptions import NotFound

    try:  # BentoML raises NotFound, rather than listing nothing, when no version exists
        return any(m.tag.name == name for m in bentoml.models.list(name))
    except NotFound:
        return False


def load(tag: str) -> StoredModel:
    """Find a model (`name` means its latest version) and check it against its manifest."""
    import bentoml
    from bentoml.exceptions import NotFound

    if ":" not in tag:
        tag += ":latest"
    try:
        model = bentoml.models.get(tag)
    except NotFound:
        name = tag.partition(":")[0]
        raise ModelIntegrityError(
            f"model {tag} is not in the model store; run `dlserve export {name}` "
            "(or `dlserve serve`, which trains and exports what is missing)"
        ) from None
    path = Path(model.path)
    manifest = read_manifest(path)
    verify_onnx(path, manifest)
    return StoredModel(tag=str(model.tag), path=path, manifest=manifest)
