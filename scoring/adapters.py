"""What a model's batch-scoring adapter is, and what every adapter shares.

A model's registry entry names its adapter (`ModelSpec.scoring`, a `Scorer`); given a job,
the adapter opens the input, checks it has the columns the model reads (`plan`), and then
turns each chunk of rows into answers (`Plan.score`), calling the checks, runner and
answer formatting of the model's HTTP contract (`dlserve/models/<name>.py`), so that a row
gets the answer, or the refusal, that the service gives the same input.

The engine (scoring/local.py, scoring/ray_engine.py) does the rest the same way for
every model: rows without an id are refused before the adapter sees them; the output
row is the id column, the adapter's passthrough columns, its answer fields and `model`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import pyarrow as pa

from dlserve.errors import InputError
from dlserve.settings import Settings
from scoring.errors import ScoringError
from scoring.formats import TableInput

T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    """One `dlserve score` command, as plain data (see cli/main.py for each flag)."""

    model: str
    input: Path
    output: Path
    model_tag: str | None = None
    engine: str = "local"
    input_format: str | None = None
    output_format: str | None = None
    id_column: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # role → input column name
    k: int = 10
    ratings: Path | None = None
    ratings_format: str | None = None
    batch_size: int = 256
    chunk_rows: int = 10_000
    max_rejects: int | None = None
    overwrite: bool = False
    quiet: bool = False
    ray_address: str | None = None
    ray_actors: int | None = None


@dataclass(frozen=True)
class Scored:
    """One chunk's answers: `good` positions (in order) got the `fields`, one value per
    good row each; `rejects` are (position, reason) pairs, in the HTTP API's words."""

    good: np.ndarray
    fields: dict[str, pa.Array]
    rejects: list[tuple[int, str]]


class Plan(ABC):
    """A job opened against its input: what it reads, writes, and how a chunk is scored."""

    id_column: str
    id_type: pa.DataType
    passthrough: tuple[pa.Field, ...] = ()  # input columns copied into each output row
    fields: pa.Schema  # the answer's columns, named as in the HTTP response
    rows: int | None = None  # input rows, when known before reading (a progress bar's total)
    unit: str = "rows"  # what a chunk counts (the recommender's top-k counts users)

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What a resumed run must match: the input files and the options that matter."""

    def check(self, runner: Any) -> None:  # noqa: B027 - optional step
        """Checks of the job's options that need the model (the recommender's --k),
        before any work; raise ScoringError."""

    def prepare(self, runner: Any, workdir: Path) -> None:  # noqa: B027 - optional step
        """A pass over the input before scoring, with its results in `workdir` (the
        recommender groups a ratings table by user there); must be safe to redo."""

    @abstractmethod
    def chunks(self, chunk_rows: int) -> Iterator[pa.Table]:
        """The input in chunks of chunk_rows rows, each with the id column, the columns
        `score` reads, and formats.ROW; chunk i is the same rows on every run."""

    @abstractmethod
    def score(self, runner: Any, chunk: pa.Table) -> Scored:
        """Answers for a chunk whose rows all have an id."""

    def ray_source(self) -> tuple[TableInput, list[str], str | None]:
        """What Ray Data reads for this job (after `prepare`): the table, its columns, and
        the one among them holding input row numbers (None: Ray's rejects have none)."""
        raise ScoringError(
            "--engine ray reads Parquet, CSV or JSON Lines tables; score this "
            "input with the local engine, or write it to Parquet first"
        )

    def output_schema(self) -> pa.Schema:
        return pa.schema(
            [
                pa.field(self.id_column, self.id_type),
                *self.passthrough,
                *self.fields,
                pa.field("model", pa.string()),
            ]
        )

    def rejects_schema(self) -> pa.Schema:
        return pa.schema(
            [
                pa.field(self.id_column, self.id_type),
                pa.field("row", pa.int64()),
                pa.field("reason", pa.string()),
            ]
        )


class Scorer(Protocol):
    """What `ModelSpec.scoring` names: opens a job for its model (or says why it cannot).
    A scorer that can replay the model's payload log also has a `replay` attribute
    (scoring.payloads.Replay; scoring/digits.py has one)."""

    def plan(self, job: Job, settings: Settings) -> Plan: ...


def reason(exc: InputError, http_field: str | Sequence[str], column: str) -> str:
    """The HTTP API's message for one item, with the request's field (`texts[0]`, `body`)
    replaced by the column it came from: "text: the text is empty or only whitespace; ..."."""
    names = [http_field] if isinstance(http_field, str) else list(http_field)
    pattern = "|".join(re.escape(n) for n in names)
    return re.sub(rf"^(?:{pattern})(?:\[0\])?", column, str(exc), count=1)


def check_each(
    items: list[T], check: Callable[[list[T]], Any], describe: Callable[[InputError], str]
) -> tuple[list[int], list[tuple[int, str]], Any]:
    """Run the HTTP contract's check on all items at once (its fast path); when it refuses,
    run it item by item to find every culprit. Returns the positions that passed, the
    (position, reason) of those that did not, and the check's result for the ones that
    passed."""
    if not items:
        return [], [], None
    try:
        return list(range(len(items))), [], check(items)
    except InputError:
        pass
    good, bad = [], []
    for i, item in enumerate(items):
        try:
            check([item])
        except InputError as exc:
            bad.append((i, describe(exc)))
        else:
            good.append(i)
    return good, bad, check([items[i] for i in good]) if good else None


def column_role(job: Job, role: str, default: str | Sequence[str], present: Sequence[str]) -> str:
    """The input column for a role: `--column ROLE=NAME`, else the first default name the
    input has, else the first default (so the missing-column message names it)."""
    if role in job.columns:
        return job.columns[role]
    names = [default] if isinstance(default, str) else list(default)
    return next((n for n in names if n in present), names[0])


def take(table: pa.Table, name: str, positions: Sequence[int] | np.ndarray) -> pa.Array:
    return table.column(name).take(pa.array(np.asarray(positions, dtype=np.int64))).combine_chunks()
