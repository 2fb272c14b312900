"""LeNet-5 on MNIST (LeCun, Bottou, Bengio & Haffner, 1998).

Layers as in the paper: C1 conv 1→6 5×5, S2 pool, C3 conv 6→16 5×5, S4 pool,
C5 conv 16→120 5×5, F6 120→84, output 84→10. Two modern substitutions, both common in
re-implementations: ReLU instead of the scaled tanh, and 2×2 max-pooling instead of the
trainable average subsampling. The paper fed 32×32 images; padding C1 by 2 gives the
28×28 MNIST digits the same geometry. With only 8,000 training images (the MNIST-10k
split) small random affine distortions, as the paper itself used, are what carries the
test accuracy past 98.5 %.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dlserve.preprocess.images import MNIST_MEAN, MNIST_STD, normalize
from readers.mnist import load_mnist
from training.common import (
    TrainingData,
    pick_device,
    reporting_progress,
    resolve_config,
    run_paths,
    save_run,
    seed_everything,
)
from training.digit_augment import NONE, Augmentation, augment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeNet5Config:
    num_classes: int = 10
    mean: float = MNIST_MEAN
    std: float = MNIST_STD


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    # What users send, learnt too (training/digit_augment.py); the --quick run goes without.
    augmentation: Augmentation = field(default_factory=Augmentation)
    seed: int = 0


QUICK = TrainConfig(epochs=4, lr=3e-3, augmentation=NONE)


@dataclass(frozen=True)
class DigitsRun:
    """config.json: what export needs to rebuild the model and describe its inputs."""

    model_config: LeNet5Config
    train_config: TrainConfig
    data: TrainingData
    model: str = "digits"
    architecture: str = "LeNet-5"


class LeNet5(nn.Module):
    def __init__(self, cfg: LeNet5Config) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, kernel_size=5, padding=2)
        self.s2 = nn.MaxPool2d(2)
        self.c3 = nn.Conv2d(6, 16, kernel_size=5)
        self.s4 = nn.MaxPool2d(2)
        self.c5 = nn.Conv2d(16, 120, kernel_size=5)
        self.f6 = nn.Linear(120, 84)
        self.output = nn.Linear(84, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, 28, 28] normalised pixels → [N, 10] logits."""
        x = self.s2(F.relu(self.c1(x)))
        x = self.s4(F.relu(self.c3(x)))
        x = F.relu(self.c5(x)).flatten(1)
        x = F.relu(self.f6(x))
        return self.output(x)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    return correct / len(x)


def train(
    data_dir: Path,
    artifacts_dir: Path,
    *,
    epochs: int | None = None,
    seed: int = 0,
    quick: bool = False,
    download_url: str | None = None,
) -> dict[str, float]:
    cfg = resolve_config(TrainConfig(), QUICK, quick=quick, seed=seed, epochs=epochs)
    gen = seed_everything(cfg.seed)
    device = pick_device()
    train_split = load_mnist(data_dir, "train", base_url=download_url)
    test_split = load_mnist(data_dir, "test", base_url=download_url)
    model_cfg = LeNet5Config()
    x_train = torch.from_numpy(normalize(train_split.images, model_cfg.mean, model_cfg.std))
    y_train = torch.from_numpy(train_split.labels)
    x_test = torch.from_numpy(normalize(test_split.images, model_cfg.mean, model_cfg.std))
    x_test, y_test = x_test.to(device), torch.from_numpy(test_split.labels).to(device)

    model = LeNet5(model_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch
    )
    history: dict[str, list[float]] = {"train loss": [], "held-out accuracy": []}
    started = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc="digits", unit="epoch")
    for _ in reporting_progress(bar, artifacts_dir, "digits", cfg.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            if not cfg.augmentation.off:
                xb = augment(xb, cfg.augmentation, gen)
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach().item() * len(idx)
        history["train loss"].append(total / len(x_train))
        # Reported each epoch for the curve only: the final weights are the last epoch's,
        # never chosen by this number.
        history["held-out accuracy"].append(accuracy(model, x_test, y_test))
        bar.set_postfix(
            loss=f"{history['train loss'][-1]:.4f}", acc=f"{history['held-out accuracy'][-1]:.4f}"
        )

    metrics = {
        "test_accuracy_torch": history["held-out accuracy"][-1],
        "train_seconds": round(time.perf_counter() - started, 1),
        "train_examples": len(x_train),
        "test_examples": len(x_test),
        "epochs": cfg.epochs,
        "quick": quick,
    }
    run = DigitsRun(
        model_cfg,
        cfg,
        TrainingData("MNIST", str(data_dir), {**train_split.files, **test_split.files}),
    )
    save_run(
        run_paths(artifacts_dir, "digits"),
        model.state_dict(),
        run,
        metrics,
        history,
        "LeNet-5 on MNIST",
    )
    return metrics


def build_model(run: DigitsRun) -> LeNet5:
    return LeNet5(run.model_config)


def example_inputs(batch: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Random normalised images for export and parity checks."""
    rng = np.random.default_rng(seed)
    return (normalize(rng.integers(0, 256, (batch, 28, 28)).astype(np.float32)),)
