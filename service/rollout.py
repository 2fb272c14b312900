"""Switching a model's version in every worker of a running server, without a restart.

A load or unload request reaches one worker (service/repository.py), but every worker
must switch. They agree through files in the server's run directory, one per server
(DLSERVE_RUN_DIR: made fresh by `bentoml serve`'s own process when it imports the
service, before it starts the workers, which inherit it):

- `desired.json`: which version of each model every worker should serve (null: none),
  the version before it (for a rollback), and a generation number; written whole and
  atomically (a temporary file renamed over it), under a lock file, by the worker that
  took the request;
- `worker-<id>.json`: what each worker serves after it last applied the desired state,
  with the generation it applied and, per model, the error if it could not.

Each worker's `Follower` thread polls desired.json's modification stamp (a stat every
POLL_S: microseconds) and applies a change: it opens and checks the new version beside
the old one (`open_checked`), then replaces the model's runner and batcher in one
assignment (service/state.py `Serving`), so that requests already queued or running finish
on the version they started with and every new one gets the new version; the old batcher
is closed once its queue is empty. A worker that starts later (circus replacing one that
died) loads what desired.json names. Why files rather than signals or a socket: the
workers share nothing else that survives one of them dying; a file is read by a worker
that did not exist when it was written, and there is nothing to connect or retry.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlserve import store
from dlserve.manifest import Manifest, ModelIntegrityError
from dlserve.registry import ModelSpec
from dlserve.runners.base import Runner
from dlserve.settings import Settings

log = logging.getLogger("dlserve.service")
RUN_DIR_ENV = "DLSERVE_RUN_DIR"
DESIRED = "desired.json"
POLL_S = 0.1


class Refused(Exception):
    """A version that cannot serve: its status (404: not in the store; 422: it does not
    load, does not match the model's contract or fails its smoke test) and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def prepare_run_dir() -> Path:
    """In `bentoml serve`'s own process (not a worker): a fresh run directory, named in
    the environment its workers inherit. A directory already named there (by the operator,
    or the test) is emptied of an earlier run's state."""
    named = os.environ.get(RUN_DIR_ENV)
    path = Path(named) if named else Path(tempfile.mkdtemp(prefix="dlserve-run-"))
    if named and path.is_dir():
        for old in [*path.glob("*.json"), *path.glob("*.tmp")]:
            old.unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[RUN_DIR_ENV] = str(path)
    return path


def run_dir() -> Path | None:
    named = os.environ.get(RUN_DIR_ENV)
    return Path(named) if named else None


def remove_run_dir() -> None:
    """At the server's exit: the run directory it made."""
    if (path := run_dir()) is not None and path.name.startswith("dlserve-run-"):
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Wish:
    tag: str | None  # the version every worker should serve; None: unloaded
    previous: str | None = None  # the version before it: what a rollback loads
    reason: str = ""  # why it is unloaded, for the answers to its requests
    canary: str | None = None  # a candidate version answering canary_percent % of requests
    canary_percent: float = 0.0


@dataclass
class Desired:
    generation: int = 0
    models: dict[str, Wish] = field(default_factory=dict)


def _write_json(path: Path, data: Any) -> None:
    """Whole or not at all: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_desired(directory: Path) -> Desired:
    try:
        raw = json.loads((directory / DESIRED).read_text())
    except FileNotFoundError:
        return Desired()
    return Desired(raw["generation"], {k: Wish(**v) for k, v in raw["models"].items()})


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """One writer of desired.json at a time, across workers."""
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def change(directory: Path, model: str, wish: Callable[[Wish | None], Wish]) -> int:
    """Set `model`'s wish (from its current one) in desired.json; the new generation."""
    with locked(directory):
        desired = read_desired(directory)
        desired.models[model] = wish(desired.models.get(model))
        desired.generation += 1
        _write_json(
            directory / DESIRED,
            {
                "generation": desired.generation,
                "models": {k: asdict(v) for k, v in desired.models.items()},
            },
        )
        return desired.generation


@dataclass
class Report:
    worker: str
    generation: int
    serving: dict[str, str | None]  # model → the tag it serves (None: none)
    errors: dict[str, str]  # model → why it could not serve the desired version
    canaries: dict[str, str | None] = field(default_factory=dict)  # model → its canary's tag


def write_report(directory: Path, report: Report) -> None:
    _write_json(directory / f"worker-{report.worker}.json", asdict(report))


def read_reports(directory: Path) -> dict[str, Report]:
    reports = {}
    for path in directory.glob("worker-*.json"):
        with contextlib.suppress(FileNotFoundError, ValueError):
            report = Report(**json.loads(path.read_text()))
            reports[report.worker] = report
    return reports


def resolve_tag(model: str, version: str) -> str:
    """`version` as a full tag: `abc123` or `digits:abc123` (anything else is refused)."""
    name, sep, part = version.partition(":")
    if not sep:
        name, part = model, version
    if name != model or not part or part == "latest":
        raise Refused(
            400,
            f"version {version!r} does not name a version of {model}: give the version "
            f"(`abc123`) or the whole tag (`{model}:abc123`)",
        )
    return f"{model}:{part}"


def _contract(m: Manifest) -> tuple[Any, ...]:
    """What every version of a model must agree on for its routes to answer the same way:
    its task, its labels, and its tensors' names and shapes (not their dtypes: an FP16
    variant may take FP16)."""
    return (
        m.task,
        tuple(m.labels),
        tuple((t.name, tuple(t.shape)) for t in m.inputs),
        tuple((t.name, tuple(t.shape)) for t in m.outputs),
    )


def _finite(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return not np.issubdtype(value.dtype, np.number) or bool(np.isfinite(value).all())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def open_checked(
    spec: ModelSpec, tag: str, settings: Settings, contract: Manifest
) -> Runner[Any, Any]:
    """Version `tag` of the model, opened, warmed up and checked: in the store and matching
    its checksum, loadable by ONNX Runtime, with the model's contract (`contract`: the
    manifest of the version the server started with), and finite answers to a smoke run.
    Raises Refused saying which of those failed."""
    try:
        stored = store.load(tag)
    except ModelIntegrityError as exc:
        status = 404 if "is not in the model store" in str(exc) else 422
        raise Refused(status, f"{tag}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - onnx's parser raises its own types
        raise Refused(422, f"{tag}: its ONNX file cannot be read: {exc}") from None
    if _contract(stored.manifest) != _contract(contract):
        raise Refused(
            422,
            f"{tag} does not match the contract of {spec.name}'s routes (its task, labels, "
            f"and tensor names and shapes): {_describe(stored.manifest)} against "
            f"{_describe(contract)}",
        )
    try:
        runner = spec.runner.open(stored, settings)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types
        raise Refused(422, f"{tag}: ONNX Runtime cannot load it: {exc}") from None
    try:
        outputs = runner.warm_up()
    except Exception as exc:  # noqa: BLE001 - whatever the run raised, it is no version to serve
        raise Refused(422, f"{tag}: its smoke run failed: {exc}") from None
    if not _finite(outputs):
        raise Refused(422, f"{tag}: its smoke run answered NaN or infinite values")
    return runner


def _describe(m: Manifest) -> str:
    inputs = ", ".join(f"{t.name}{t.shape}" for t in m.inputs)
    outputs = ", ".join(f"{t.name}{t.shape}" for t in m.outputs)
    return f"task {m.task}, {len(m.labels)} labels, inputs {inputs}, outputs {outputs}"


class Follower:
    """A worker's thread that applies desired.json (see the module's docstring).

    `apply(model, wish)` makes the worker serve what the wish names and returns an error
    message, or None; it runs on this thread, so a slow load blocks no request."""

    def __init__(
        self,
        directory: Path,
        worker: str,
        apply: Callable[[str, Wish], str | None],
        serving: Callable[[], tuple[dict[str, str | None], dict[str, str | None]]],
    ) -> None:
        self.directory = directory
        self.worker = worker
        self.apply = apply
        self.serving = serving
        self.stamp: tuple[int, int] | None = None
        self.generation = 0
        self.applied: dict[str, Wish] = {}
        self.errors: dict[str, str] = {}

    def start(self) -> None:
        # This worker's report at once: a load waits for every worker's.
        write_report(self.directory, Report(self.worker, 0, *self.serving_now({})))
        threading.Thread(target=self._loop, name="dlserve-rollout", daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - keep following; the next change may apply
                log.exception("rollout: could not apply %s", self.directory / DESIRED)
            time.sleep(POLL_S)

    def poll(self) -> None:
        try:
            st = (self.directory / DESIRED).stat()
        except FileNotFoundError:
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self.stamp:
            return
        self.stamp = stamp
        desired = read_desired(self.directory)
        if desired.generation <= self.generation:
            return
        for model, wish in desired.models.items():
            if self.applied.get(model) == wish and model not in self.errors:
                continue
            error = self.apply(model, wish)
            if error is None:
                self.errors.pop(model, None)
                self.applied[model] = wish
            else:
                self.errors[model] = error
        self.generation = desired.generation
        write_report(
            self.directory, Report(self.worker, self.generation, *self.serving_now(self.errors))
        )

    def serving_now(
        self, errors: dict[str, str]
    ) -> tuple[dict[str, str | None], dict[str, str], dict[str, str | None]]:
        serving, canaries = self.serving()
        return serving, dict(errors), canaries
