"""What every training script shares: seeding, device choice, and the run's artefacts.

A run directory holds `checkpoint.pt` (a state_dict: tensors only, loadable with
`weights_only=True`), `config.json` (the run's typed config, a dataclass per model:
everything needed to rebuild the model and preprocess its inputs), `metrics.json` and
`curve.png`. Export reads the config back into the same dataclass (`load_run`), so a
field it needs is checked when the file is read, not looked up by a string later.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import TypeAdapter, ValidationError

from dlserve import progress

log = logging.getLogger(__name__)
C = TypeVar("C")  # a model's TrainConfig dataclass
M = TypeVar("M", bound=torch.nn.Module)
R = TypeVar("R")  # a model's run config dataclass (DigitsRun, ...)


@dataclass(frozen=True)
class TrainingData:
    """The data a run trained on, recorded in the model's manifest."""

    dataset: str
    dir: str
    files: dict[str, str]  # file name -> SHA-256
    layout: str = ""


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def curve(self) -> Path:
        return self.root / "curve.png"


def run_paths(artifacts_dir: Path, model: str) -> RunPaths:
    return RunPaths(artifacts_dir / model)


def resolve_config(default: C, quick_cfg: C, *, quick: bool, seed: int, epochs: int | None) -> C:
    """The run's training config: the default (or the --quick one) with the CLI's seed and,
    when given, its epoch count."""
    base = quick_cfg if quick else default
    return replace(base, seed=seed, **({"epochs": epochs} if epochs else {}))


def reporting_progress(
    epochs: Iterable[int], artifacts_dir: Path, model: str, total: int
) -> Iterator[int]:
    """The training loop's epochs, with the run folder's progress file updated as each one
    ends (dlserve/progress.py): a service that waits for this model tells its clients how
    long it will be."""
    run_dir = run_paths(artifacts_dir, model).root
    started = time.time()
    progress.write(run_dir, progress.Progress(model, 0, total, started, started))
    for done, epoch in enumerate(epochs, start=1):
        yield epoch
        progress.write(run_dir, progress.Progress(model, done, total, started, time.time()))


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device() -> torch.device:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log.info("training on %s", device)
    return device


def save_run(
    paths: RunPaths,
    state_dict: dict[str, torch.Tensor],
    run: Any,
    metrics: dict[str, Any],
    history: dict[str, list[float]],
    title: str,
) -> None:
    """Write the run's artefacts; `run` is the model's run config dataclass."""
    paths.root.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, paths.checkpoint)
    paths.config.write_text(json.dumps(asdict(run), indent=2) + "\n")
    paths.metrics.write_text(json.dumps({**metrics, "history": history}, indent=2) + "\n")
    plot_curve(history, paths.curve, title)


def load_run(
    paths: RunPaths, run_type: type[R]
) -> tuple[dict[str, torch.Tensor], R, dict[str, Any]]:
    """Checkpoint, typed config and metrics of a finished run; never unpickles arbitrary
    objects (`weights_only=True`)."""
    for p in (paths.checkpoint, paths.config, paths.metrics):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: train the model first (dlserve train)")
    state = torch.load(paths.checkpoint, map_location="cpu", weights_only=True)
    try:
        run = TypeAdapter(run_type).validate_json(paths.config.read_bytes())
    except ValidationError as exc:
        raise ValueError(
            f"{paths.config} does not fit this version's {run_type.__name__} "
            f"({exc.error_count()} problem(s), first: {exc.errors()[0]['loc']} "
            f"{exc.errors()[0]['msg']}): train the model again"
        ) from None
    return state, run, json.loads(paths.metrics.read_text())


def load_trained(
    artifacts_dir: Path, name: str, run_type: type[R], build: Callable[[R], M]
) -> tuple[M, R, dict[str, Any]]:
    """The trained model of a finished run (built by `build` from its config), its config and
    metrics. A checkpoint from an older version of the model is refused by name."""
    state, run, metrics = load_run(run_paths(artifacts_dir, name), run_type)
    model = build(run)
    expected = model.state_dict().keys()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"the {name} checkpoint does not fit this version's model (missing: "
            f"{', '.join(missing) or 'none'}; unexpected: "
            f"{', '.join(unexpected) or 'none'}): train it again "
            f"(dlserve train {name})"
        )
    model.load_state_dict(state)
    return model, run, {k: v for k, v in metrics.items() if k != "history"}


def plot_curve(history: dict[str, list[float]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(history), figsize=(5 * len(history), 3.5), squeeze=False)
    for ax, (name, values) in zip(axes[0], history.items(), strict=True):
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
