"""What makes a scoring job resumable, exactly once: its partial work beside the output.

`OUTPUT.partial/` holds `job.json` (what the job is: model tag, input files with sizes and
mtimes, options; a re-run of the same command resumes, another job is refused), and one
`part-NNNNNN.parquet` per finished input chunk, with its `rejects-NNNNNN.parquet`. A part
file is written under a temporary name and renamed, the rejects first, so a chunk is done
exactly when its part file exists: a job killed at any moment loses at most the chunk in
hand, and re-scores it whole. When every chunk is done, the parts are streamed into
`output.tmp` and `rejects.tmp`, the `assembled` mark is written, the two are renamed onto
their final names and the folder is removed: the output appears under its name only
complete, and a kill between the two renames is finished by the next run.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from scoring.errors import ScoringError
from scoring.formats import TableWriter

JOB_FILE = "job.json"
ASSEMBLED = "assembled"
PRE_REJECTS = "rejects-prepare.parquet"  # rows a preparing pass refused (e.g. grouping)


def rejects_path(output: Path) -> Path:
    """scores.parquet → scores.rejects.parquet (same folder, same format)."""
    if output.suffix:
        return output.with_name(f"{output.stem}.rejects{output.suffix}")
    return output.with_name(output.name + ".rejects")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_parquet_atomically(
    path: Path, table: pa.Table, *, row_group_rows: int | None = None
) -> None:
    tmp = path.with_name(path.name + ".tmp")
    writer = TableWriter(tmp, "parquet", table.schema)
    for batch in table.to_batches(max_chunksize=row_group_rows):
        writer.write(pa.Table.from_batches([batch]))
    writer.close()
    os.replace(tmp, path)


@dataclass(frozen=True)
class WorkDir:
    output: Path
    output_format: str

    @property
    def path(self) -> Path:
        return self.output.with_name(self.output.name + ".partial")

    @property
    def rejects(self) -> Path:
        return rejects_path(self.output)

    def recorded(self) -> dict[str, Any] | None:
        """The job.json of partial work left by an earlier run, if any."""
        try:
            return json.loads((self.path / JOB_FILE).read_text())
        except (OSError, ValueError):
            return None

    def start(self, identity: dict[str, Any], *, overwrite: bool) -> bool:
        """Set up (or take up again) the job's partial work; False when there is nothing to
        do because the output of a finished job is already there."""
        if (self.path / ASSEMBLED).exists():
            finished = self.recorded()
            self.finish()  # killed between the final renames: complete them
            if finished == identity:
                return False
        if self.path.exists():
            recorded = self.recorded()
            if recorded is None:  # killed before job.json was written: nothing was done
                shutil.rmtree(self.path)
            elif recorded != identity:
                if not overwrite:
                    changed = sorted(
                        k for k in {*recorded, *identity} if recorded.get(k) != identity.get(k)
                    )
                    raise ScoringError(
                        f"{self.path} holds the partial work of another job (it differs in: "
                        f"{', '.join(changed)}); run that job's command again to finish it, "
                        "or add --overwrite to discard it"
                    )
                shutil.rmtree(self.path)
        if self.output.exists() and not overwrite:
            if self.path.exists():
                raise ScoringError(f"{self.output} exists; add --overwrite to replace it")
            return False
        self.path.mkdir(exist_ok=True)
        if not (self.path / JOB_FILE).exists():
            tmp = self.path / (JOB_FILE + ".tmp")
            tmp.write_text(json.dumps(identity, indent=1))
            os.replace(tmp, self.path / JOB_FILE)
        return True

    def part(self, index: int) -> Path:
        return self.path / f"part-{index:06d}.parquet"

    def done(self) -> dict[int, tuple[int, int]]:
        """Finished chunks: index → (rows written, rows rejected)."""
        out = {}
        for part in self.path.glob("part-*.parquet"):
            index = int(part.stem.removeprefix("part-"))
            rejected = pq.ParquetFile(self.path / f"rejects-{index:06d}.parquet")
            out[index] = (pq.ParquetFile(part).metadata.num_rows, rejected.metadata.num_rows)
        return out

    def prepare_rejects(self) -> int:
        """Rows refused by the preparing pass (scoring/recommender.py's grouping)."""
        path = self.path / PRE_REJECTS
        return pq.ParquetFile(path).metadata.num_rows if path.exists() else 0

    def commit(self, index: int, rows: pa.Table, rejects: pa.Table) -> None:
        """Record one chunk's results; the part file's rename is the commit."""
        write_parquet_atomically(self.path / f"rejects-{index:06d}.parquet", rejects)
        write_parquet_atomically(self.part(index), rows)

    def _assemble_one(
        self, pattern: str, schema: pa.Schema, tmp: Path, first: tuple[Path, ...] = ()
    ) -> None:
        writer = TableWriter(tmp, self.output_format, schema)
        for path in (*first, *sorted(self.path.glob(pattern))):
            for batch in pq.ParquetFile(path).iter_batches():
                writer.write(pa.Table.from_batches([batch]).cast(schema))
        writer.close()

    def assemble(self, schema: pa.Schema, rejects_schema: pa.Schema) -> None:
        """Stream every part, in chunk order, into the final files, then put them in place."""
        pre = tuple(p for p in [self.path / PRE_REJECTS] if p.exists())
        self._assemble_one("rejects-[0-9]*.parquet", rejects_schema, self.path / "rejects.tmp", pre)
        self._assemble_one("part-*.parquet", schema, self.path / "output.tmp")
        (self.path / ASSEMBLED).write_text("")
        _fsync_dir(self.path)
        self.finish()

    def finish(self) -> None:
        for tmp, final in (
            (self.path / "rejects.tmp", self.rejects),
            (self.path / "output.tmp", self.output),
        ):
            if tmp.exists():
                os.replace(tmp, final)
        _fsync_dir(self.output.parent)
        shutil.rmtree(self.path)
