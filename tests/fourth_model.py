"""A fourth model, added the way docs/adding-a-model.md says, to prove the registry: a
one-hidden-layer MLP on the MNIST digits, named `mlp`.

Everything about it is in this one module, registered with
`DLSERVE_MODEL_MODULES=tests.fourth_model`: its registry entry, runner and route (reusing
the digits request type and checks), its training, export, evaluation and bench workload.
The CLI, the service and the bench run it without a line of theirs changed
(tests/test_adding_a_model.py). PyTorch is imported inside `train` and `export` only, so
the serving side can import this module without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlserve.models import digits
from dlserve.prepared import Prepared
from dlserve.preprocess.images import MNIST_MEAN, MNIST_STD, SIDE, normalize
from dlserve.registry import DataSource, ModelSpec, Ref, Route
from dlserve.runners.base import Runner, softmax, split_rows
from dlserve.store import StoredModel

HIDDEN = 64


class MlpRunner(Runner[np.ndarray, np.ndarray]):
    def predict(self, pixels: np.ndarray) -> np.ndarray:
        x = normalize(pixels, MNIST_MEAN, MNIST_STD).reshape(len(pixels), SIDE * SIDE)
        (logits,) = self.session.run({self.session.input_names[0]: x})
        return softmax(logits)

    def run_batch(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        return split_rows(self.predict(np.concatenate(parts)), [len(p) for p in parts])

    def warm_up(self) -> list[np.ndarray]:
        return [self.predict(np.zeros((4, SIDE, SIDE), np.float32))]


def respond(runner: MlpRunner, prepared: Prepared, probs: np.ndarray) -> digits.DigitsResponse:
    return digits.DigitsResponse(model=runner.tag, predictions=digits.predictions(probs))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    lr: float = 3e-3
    seed: int = 0


@dataclass(frozen=True)
class MlpRun:
    train_config: TrainConfig
    data_files: dict[str, str]
    hidden: int = HIDDEN


def _build(run: MlpRun) -> Any:
    from torch import nn

    return nn.Sequential(nn.Linear(SIDE * SIDE, run.hidden), nn.ReLU(), nn.Linear(run.hidden, 10))


def train(
    data_dir: Path,
    artifacts_dir: Path,
    *,
    epochs: int | None = None,
    seed: int = 0,
    quick: bool = False,
    download_url: str | None = None,
) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from readers.mnist import load_mnist
    from training.common import run_paths, save_run, seed_everything

    cfg = TrainConfig(epochs=epochs or (1 if quick else TrainConfig.epochs), seed=seed)
    seed_everything(seed)
    split = load_mnist(data_dir, "train", base_url=download_url)
    x = torch.from_numpy(normalize(split.images).reshape(-1, SIDE * SIDE))
    y = torch.from_numpy(split.labels)
    run = MlpRun(cfg, split.files)
    model = _build(run)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    losses = []
    for _ in range(cfg.epochs):
        for i in range(0, len(x), 64):
            loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(float(loss))
    metrics = {"train_loss": losses[-1], "epochs": cfg.epochs}
    save_run(
        run_paths(artifacts_dir, "mlp"),
        model.state_dict(),
        run,
        metrics,
        {"train loss": losses},
        "MLP on MNIST",
    )
    return metrics


def export(artifacts_dir: Path, *, precision: str = "fp32") -> StoredModel:
    from dlserve.manifest import TensorSpec
    from export.onnx_export import ExportSpec, export_and_publish
    from training.common import load_trained

    model, run, metrics = load_trained(artifacts_dir, "mlp", MlpRun, _build)
    rng = np.random.default_rng(0)

    def example(n: int) -> tuple[np.ndarray]:
        return (rng.standard_normal((n, SIDE * SIDE)).astype(np.float32),)

    spec = ExportSpec(
        name="mlp",
        task="image-classification",
        architecture=f"MLP 784-{run.hidden}-10",
        inputs=[TensorSpec("pixels", "float32", ["batch", SIDE * SIDE])],
        outputs=[TensorSpec("logits", "float32", ["batch", 10])],
        preprocessing={"kind": "mnist", "mean": MNIST_MEAN, "std": MNIST_STD},
        labels=[str(d) for d in range(10)],
        assets={},
        metrics=metrics,
        training_data={"dataset": "MNIST", "files": run.data_files, **asdict(run)},
        example=example(2),
        parity_cases=[example(1), example(9)],
    )
    return export_and_publish(model, spec, precision=precision)


def evaluate(runner: MlpRunner, source: DataSource) -> dict[str, Any]:
    from readers.mnist import load_mnist

    test = load_mnist(source.folder, "test", base_url=source.url)
    predicted = runner.predict(test.images).argmax(axis=1)
    return {
        "model": runner.tag,
        "examples": len(test.labels),
        "accuracy": round(float((predicted == test.labels).mean()), 4),
    }


def _requests(source: DataSource, items: int, count: int, encoding: str) -> list[Any]:
    """The digits workload's request bodies, sent to this model's route."""
    from bench.workloads import digits_requests

    return [("/mlp/predict", body) for _, body in digits_requests(source, items, count, encoding)]


def _workload() -> Any:
    from bench.workloads import Workload, digits_parts

    return Workload(digits_parts, _requests)


MODEL = ModelSpec(
    name="mlp",
    task="image-classification",
    summary="handwritten digits: a small MLP, the registry's fourth model (tests only)",
    runner=MlpRunner,
    routes=(
        Route(
            "/mlp/predict",
            "Classify 28×28 digit images with the MLP",
            digits.DigitsResponse,
            digits.prepare_arrays,
            respond,
            request=digits.DigitsRequest,
        ),
    ),
    data=digits.mnist,
    train=Ref("tests.fourth_model:train"),
    export=Ref("tests.fourth_model:export"),
    evaluate=Ref("tests.fourth_model:evaluate"),
    workload=Ref("tests.fourth_model:WORKLOAD"),
)


def __getattr__(name: str) -> Any:
    # The bench's Workload is built on first use, so that importing this module (as the
    # service does) never imports the bench.
    if name == "WORKLOAD":
        return _workload()
    raise AttributeError(name)
