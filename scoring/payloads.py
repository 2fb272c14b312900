"""Payload logs as batch-scoring input: yesterday's real traffic, scored by another version.

`dlserve score MODEL LOG OUTPUT` takes a payload log (DLSERVE_PAYLOAD_LOG's folder of
`payloads-*.jsonl.gz` files, or one of them; docs/payload-logging.md) as its input. Each
record of MODEL that was answered (status 200) becomes one row per item it carried (an
image, a text): id `<request id>#<item>`, the route, the version that answered
(`served_by`), and the columns the model's own adapter reads (`Replay.columns`). The rows
are scored by that adapter's plans (scoring/<model>.py), with the same checks, runner and
answer formatting as any other batch job: a replay is a scoring job, not a second path.

The files are read in name order (the order they were written in, per worker), so chunk
i is the same rows on every run and a replay resumes like any job. Files still being
written (`.NAME.part`) are not read. A record whose inputs are not in the log (logged
outputs only, or a body over the size cap) is a rejected row per item, saying why.

`answers` reads the answers the service gave, for `dlserve compare` (scoring/compare.py).
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from dlserve.settings import Settings
from scoring.adapters import Job, Plan, Scored
from scoring.errors import ScoringError
from scoring.formats import ROW, fingerprint

log = logging.getLogger("dlserve.score")
FORMAT = "payloads"
SUFFIX = ".jsonl.gz"
ID = "id"
PASSTHROUGH = (pa.field("route", pa.string()), pa.field("served_by", pa.string()))
NOT_LOGGED = (
    "inputs: not in the payload log (DLSERVE_PAYLOAD_LOG_MODE=response, or the body was "
    "over DLSERVE_PAYLOAD_LOG_MAX_BYTES); nothing to score"
)


@dataclass(frozen=True)
class Item:
    """One item of a logged request: the input columns it fills (none when its inputs were
    not logged) and the answer the service gave it, in the model's output columns."""

    inputs: dict[str, Any]
    answer: dict[str, Any]


@dataclass(frozen=True)
class Replay:
    """What a model's adapter (scoring/<model>.py) declares for replaying its payload log."""

    columns: pa.Schema  # the input columns its plans read
    # (route, logged inputs or None, logged outputs) → items; None: the route is not one
    # this model can replay (another model's, or one the adapter does not read)
    unpack: Callable[[str, Any, Any], list[Item] | None]
    # (job, settings) → a plan per input column, scoring the rows that fill that column
    plans: Callable[[Job, Settings], dict[str, Plan]]
    # an answer table → (label, confidence) per row, for dlserve compare
    label_confidence: Callable[[pa.Table], tuple[np.ndarray, np.ndarray]]
    fields: pa.Schema  # the answer's columns, as `dlserve score` writes them


def is_log(path: Path, given: str | None) -> bool:
    """Whether an input is a payload log: --input-format payloads, or by its name."""
    if given:
        return given == FORMAT
    if path.is_dir():
        return any(p.name.endswith(SUFFIX) for p in path.iterdir() if not p.name.startswith("."))
    return path.name.endswith(SUFFIX)


def log_files(path: Path) -> list[Path]:
    """The closed log files of a folder, in name order (a file: itself)."""
    if not path.exists():
        raise ScoringError(f"input {path}: no such file or folder")
    if path.is_file():
        return [path]
    files = sorted(
        p for p in path.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith(".")
    )
    if not files:
        raise ScoringError(f"input {path}: the folder holds no payload log files (*{SUFFIX})")
    return files


def records(files: list[Path]) -> Iterator[dict[str, Any]]:
    for path in files:
        try:
            with gzip.open(path, "rb") as f:
                for number, line in enumerate(f, 1):
                    try:
                        yield orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        # The writer splices bodies the route parsed (service/payload_log.py);
                        # one orjson cannot read (an integer past 64 bits) is said and skipped.
                        log.warning("%s:%d: skipped, not a JSON record (%s)", path, number, exc)
        except (OSError, EOFError) as exc:
            raise ScoringError(f"{path}: cannot be read as a gzip payload log ({exc})") from None


def logged_items(
    files: list[Path], model: str, replay: Replay
) -> Iterator[tuple[str, dict[str, Any], Item]]:
    """(row id, record, item) for every item of every answered record of `model`."""
    for record in records(files):
        if record.get("model") != model or record.get("status") != 200:
            continue
        items = replay.unpack(str(record.get("route")), record.get("inputs"), record.get("outputs"))
        for i, item in enumerate(items or []):
            yield f"{record.get('id')}#{i}", record, item


class ReplayPlan(Plan):
    """A payload log scored by the model's own plans, one per input column."""

    id_column = ID
    id_type = pa.string()
    passthrough = PASSTHROUGH

    def __init__(self, job: Job, settings: Settings, model: str, replay: Replay) -> None:
        self.files = log_files(job.input)
        self.model, self.replay = model, replay
        self.plans = replay.plans(job, settings)
        self.fields = replay.fields

    def identity(self) -> dict[str, Any]:
        return {"input": [f for p in self.files for f in fingerprint(p)], "format": FORMAT}

    def chunks(self, chunk_rows: int) -> Iterator[pa.Table]:
        schema = pa.schema(
            [
                pa.field(ID, pa.string()),
                *PASSTHROUGH,
                *self.replay.columns,
                pa.field(ROW, pa.int64()),
            ]
        )
        rows: list[dict[str, Any]] = []
        number = 0
        for row_id, record, item in logged_items(self.files, self.model, self.replay):
            rows.append(
                {
                    ID: row_id,
                    "route": record.get("route"),
                    "served_by": record.get("model_tag"),
                    **item.inputs,
                    ROW: number,
                }
            )
            number += 1
            if len(rows) == chunk_rows:
                yield pa.Table.from_pylist(rows, schema)
                rows = []
        if rows or number == 0:
            yield pa.Table.from_pylist(rows, schema)

    def score(self, runner: Any, chunk: pa.Table) -> Scored:
        """Each row by the plan of the input column it fills; a row that fills none had its
        inputs left out of the log."""
        filled = {
            column: ~chunk.column(column).is_null().to_numpy(zero_copy_only=False)
            for column in self.plans
        }
        unclaimed = np.ones(len(chunk), bool)
        parts: list[tuple[np.ndarray, Scored]] = []
        rejects: list[tuple[int, str]] = []
        for column, plan in self.plans.items():
            positions = np.flatnonzero(filled[column] & unclaimed)
            unclaimed[positions] = False
            if len(positions):
                scored = plan.score(runner, chunk.take(pa.array(positions)))
                parts.append((positions[scored.good], scored))
                rejects += [(int(positions[i]), why) for i, why in scored.rejects]
        rejects += [(int(i), NOT_LOGGED) for i in np.flatnonzero(unclaimed)]
        return _merged(parts, sorted(rejects), self.fields)


def _merged(
    parts: list[tuple[np.ndarray, Scored]], rejects: list[tuple[int, str]], fields: pa.Schema
) -> Scored:
    """Several plans' answers for parts of one chunk, as one, in chunk order."""
    if not parts:
        return Scored(
            np.empty(0, np.int64), {f.name: pa.array([], f.type) for f in fields}, rejects
        )
    good = np.concatenate([positions for positions, _ in parts])
    order = pa.array(np.argsort(good, kind="stable"))
    columns = {
        f.name: pa.concat_arrays([s.fields[f.name].cast(f.type) for _, s in parts]).take(order)
        for f in fields
    }
    return Scored(np.sort(good), columns, rejects)


class ReplayPart:
    """Mixed into a model's plan class to make one of `Replay.plans`: a plan that only
    scores rows handed to it (the replay reads the log)."""

    def identity(self) -> dict[str, Any]:
        return {}

    def chunks(self, chunk_rows: int) -> Iterator[pa.Table]:
        return iter(())


def tensor(tensors: Any, name: str) -> list[Any] | None:
    """The `data` of an Open Inference Protocol tensor by name, from a logged JSON request
    or response (`inputs` or `outputs`); None when it is not there as JSON."""
    if not isinstance(tensors, list):
        return None
    for t in tensors:
        if isinstance(t, dict) and t.get("name") == name and isinstance(t.get("data"), list):
            return list(t["data"])
    return None


def json_field(logged: Any, name: str) -> Any:
    """A field of a logged JSON body; None for a body that is not a JSON object (a
    summary, base64 bytes, or absent)."""
    if not isinstance(logged, dict) or "omitted" in logged or "base64" in logged:
        return None
    return logged.get(name)


def paired(
    inputs: list[dict[str, Any]] | None, answers: list[dict[str, Any]] | None
) -> list[Item] | None:
    """Items from a record's unpacked inputs and answers, either of which may be missing
    (a logged body over the cap, or left out by DLSERVE_PAYLOAD_LOG_MODE)."""
    if inputs is None and answers is None:
        return None
    n = len(inputs) if inputs is not None else len(answers or [])
    if inputs is not None and answers is not None and len(answers) != n:
        answers = None  # cannot be paired item by item: replayed, not compared
    return [
        Item(inputs[i] if inputs is not None else {}, answers[i] if answers is not None else {})
        for i in range(n)
    ]


def replay_of(model: str, scorer: Any) -> Replay:
    """A model's Replay, from its batch-scoring adapter (`ModelSpec.scoring`); an adapter
    of a model from outside this repository may have none."""
    replay: Replay | None = getattr(scorer, "replay", None) if scorer is not None else None
    if replay is None:
        raise ScoringError(
            f"model {model!r}: its batch-scoring adapter cannot replay a payload log yet "
            "(no `replay` in scoring/<model>.py)"
        )
    return replay


def plan(job: Job, settings: Settings, model: str, scorer: Any) -> Plan:
    return ReplayPlan(job, settings, model, replay_of(model, scorer))


def answers(path: Path, model: str, replay: Replay) -> pa.Table:
    """The answers the service gave, as `dlserve score` writes them: id, route, served_by
    and the model's answer columns, one row per item."""
    rows = [
        {
            ID: row_id,
            "route": record.get("route"),
            "served_by": record.get("model_tag"),
            **item.answer,
        }
        for row_id, record, item in logged_items(log_files(path), model, replay)
    ]
    schema = pa.schema([pa.field(ID, pa.string()), *PASSTHROUGH, *replay.fields])
    return pa.Table.from_pylist(rows, schema)
