"""The local engine: one process, one ONNX Runtime session, the input chunk by chunk.

Each chunk is scored and committed to the job's partial work (scoring/checkpoint.py)
before the next is read, so memory holds one chunk (plus the reader's read-ahead) however
big the input, and a killed job re-scores at most the chunk in hand.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from scoring.adapters import Plan
from scoring.checkpoint import WorkDir
from scoring.errors import ScoringError
from scoring.formats import ROW


@dataclass(frozen=True)
class Counts:
    rows: int  # input units read (rows; users for the recommender's top-k)
    written: int
    rejected: int
    seconds: float
    resumed_chunks: int = 0
    unit: str = "rows"


class TooManyRejects(ScoringError):
    pass


def score_chunk(plan: Plan, runner: Any, chunk: pa.Table) -> tuple[pa.Table, pa.Table]:
    """One chunk → (output rows, rejected rows): the part every engine shares."""
    missing = chunk.column(plan.id_column).is_null()
    no_id = np.flatnonzero(missing.to_numpy(zero_copy_only=False))
    with_id = chunk.filter(pc.invert(missing)) if len(no_id) else chunk
    scored = plan.score(runner, with_id)
    good = pa.array(np.asarray(scored.good, dtype=np.int64))
    kept = with_id.take(good)
    rows = pa.table(
        {
            plan.id_column: kept.column(plan.id_column),
            **{f.name: kept.column(f.name) for f in plan.passthrough},
            **scored.fields,
            "model": pa.array([runner.tag] * len(kept), pa.string()),
        }
    )
    bad = np.asarray([i for i, _ in scored.rejects], dtype=np.int64)
    rejects = pa.table(
        {
            plan.id_column: pa.concat_arrays(
                [
                    pa.nulls(len(no_id), plan.id_type),
                    with_id.column(plan.id_column)
                    .take(pa.array(bad))
                    .combine_chunks()
                    .cast(plan.id_type),
                ]
            ),
            "row": pa.concat_arrays(
                [
                    chunk.column(ROW).take(pa.array(no_id)).combine_chunks(),
                    with_id.column(ROW).take(pa.array(bad)).combine_chunks(),
                ]
            ),
            "reason": [f"{plan.id_column}: missing; every row needs an id"] * len(no_id)
            + [r for _, r in scored.rejects],
        }
    )
    return rows.cast(plan.output_schema()), rejects.sort_by("row").cast(plan.rejects_schema())


def run(
    plan: Plan, runner: Any, work: WorkDir, *, chunk_rows: int, max_rejects: int | None, quiet: bool
) -> Counts:
    """Score every chunk not done yet, then assemble the output. Reading the next chunk and
    committing the last one happen in two helper threads while the model runs (pyarrow
    releases the GIL while it reads and writes), one chunk ahead and one behind at most."""
    started = time.perf_counter()
    plan.prepare(runner, work.path)
    done = work.done()
    rows = written = 0
    rejected = work.prepare_rejects()
    chunks = plan.chunks(chunk_rows)
    with (
        tqdm(
            total=plan.rows,
            unit=f" {plan.unit}",
            unit_scale=True,
            dynamic_ncols=True,
            disable=True if quiet else None,
            desc=runner.tag,
        ) as bar,
        ThreadPoolExecutor(1, "score-read") as reader,
        ThreadPoolExecutor(1, "score-commit") as committer,
    ):
        ahead: Future[pa.Table | None] = reader.submit(next, chunks, None)
        behind: Future[None] | None = None
        index = 0
        while (chunk := ahead.result()) is not None:
            ahead = reader.submit(next, chunks, None)
            if index in done:
                n_written, n_rejected = done[index]
            else:
                part, rejects = score_chunk(plan, runner, chunk)
                if behind is not None:
                    behind.result()
                behind = committer.submit(work.commit, index, part, rejects)
                n_written, n_rejected = len(part), len(rejects)
            rows, written, rejected = (
                rows + len(chunk),
                written + n_written,
                rejected + n_rejected,
            )
            bar.update(len(chunk))
            bar.set_postfix(rejects=rejected, refresh=False)
            if max_rejects is not None and rejected > max_rejects:
                if behind is not None:
                    behind.result()
                raise TooManyRejects(
                    f"stopped: {rejected} rejected rows is more than --max-rejects "
                    f"{max_rejects}; the reasons are in {work.path}/rejects-*.parquet. The "
                    "work done is kept: the same command with a higher --max-rejects goes on "
                    "from here"
                )
            index += 1
        if behind is not None:
            behind.result()
    work.assemble(plan.output_schema(), plan.rejects_schema())
    return Counts(rows, written, rejected, time.perf_counter() - started, len(done), plan.unit)
