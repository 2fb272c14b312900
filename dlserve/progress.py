"""How far a model's training has got: written by training after each epoch, read by the
service while `dlserve serve` trains the model beside it (a request to it is told roughly
when it will be served). Torch-free: a small JSON file, `progress.json`, in the model's run
folder (artifacts/<model>/).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PROGRESS_FILE = "progress.json"
# Export (ONNX, parity checks, the store) and a worker's load and warm-up after the last
# epoch: 10-20 s for each model on the 2-core machine.
AFTER_TRAINING_S = 20.0


@dataclass(frozen=True)
class Progress:
    model: str
    epochs_done: int
    epochs: int  # at most: early stopping may end the run sooner
    started_at: float  # time.time() when training began
    updated_at: float

    def remaining_s(self) -> float | None:
        """Seconds until the model can be served, at the pace of the epochs so far (None
        before the first epoch has ended)."""
        if self.epochs_done == 0:
            return None
        per_epoch = (self.updated_at - self.started_at) / self.epochs_done
        left = per_epoch * (self.epochs - self.epochs_done) + AFTER_TRAINING_S
        return max(left - (time.time() - self.updated_at), AFTER_TRAINING_S / 2)

    def describe(self) -> str:
        """'epoch 2 of 12 done, about 9 minutes to go', for the clients that wait."""
        if self.epochs_done == 0:
            since = time.time() - self.started_at
            return f"training started {_duration(since)} ago; its first epoch is not done yet"
        remaining = self.remaining_s() or 0.0
        done = (
            "training has ended; it is being exported"
            if self.epochs_done >= self.epochs
            else f"epoch {self.epochs_done} of at most {self.epochs} done"
        )
        return f"{done}, about {_duration(remaining)} to go"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(math.ceil(seconds), 1)} s"
    return f"{math.ceil(seconds / 60)} minutes"


def write(run_dir: Path, progress: Progress) -> None:
    """Replace the run folder's progress file whole (a rename), so a reader never sees half."""
    run_dir.mkdir(parents=True, exist_ok=True)
    part = run_dir / f".{PROGRESS_FILE}.{os.getpid()}"
    part.write_text(json.dumps(asdict(progress)) + "\n")
    part.replace(run_dir / PROGRESS_FILE)


def read(run_dir: Path) -> Progress | None:
    """The run folder's progress, if training has written one that this version can read."""
    try:
        return Progress(**json.loads((run_dir / PROGRESS_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None
