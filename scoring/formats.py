"""Tables in and out: Parquet, CSV (or TSV) and JSON Lines, read and written in chunks.

Inputs are read with pyarrow datasets (one file, or a folder of files of one format), in
chunks of exactly `chunk_rows` rows, so that chunk i is always the same rows whatever the
file's row groups are: that is what makes a job resumable by chunk index. Outputs are
written batch by batch; CSV has no nested types, so list and struct columns go into CSV
as JSON text.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from scoring.errors import ScoringError

FORMATS = ("parquet", "csv", "tsv", "jsonl")
EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".data": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
ROW = "__row"  # a chunk's row numbers in the input (0-based), carried beside its columns
# Batches read ahead of the one being scored: enough to overlap reading with the model,
# few enough that memory does not grow with the chunk size times pyarrow's default (16).
READAHEAD = 2


def detect(path: Path, given: str | None, *, default: str | None = None) -> str:
    """The format of a file: `given` (--input-format/--output-format), else its extension."""
    if given:
        return given
    if path.is_dir():
        kinds = {EXTENSIONS.get(p.suffix.lower()) for p in path.iterdir() if p.is_file()}
        kinds.discard(None)
        if len(kinds) == 1:
            return kinds.pop()  # type: ignore[return-value]
    elif (kind := EXTENSIONS.get(path.suffix.lower())) is not None:
        return kind
    if default:
        return default
    raise ScoringError(
        f"{path}: cannot tell its format from its name; say which with "
        f"--input-format ({', '.join(FORMATS)})"
    )


def fingerprint(path: Path) -> list[list[Any]]:
    """What identifies an input's contents for resuming: each file's name, size and mtime."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p.resolve()), (s := p.stat()).st_size, s.st_mtime_ns] for p in files]


def _first_line(path: Path) -> str:
    with open(path, "rb") as f:
        return f.readline(1 << 20).decode("utf-8", "replace").strip()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _csv_options(
    path: Path, delimiter: str, headerless: tuple[str, ...], types: dict[str, pa.DataType]
) -> dict[str, Any]:
    """pyarrow's CSV options for a file (the local engine's dataset and Ray's reader take
    the same ones); a file whose first line is all numbers has no header row (MovieLens's
    u.data), and its columns get the adapter's names for such files."""
    sample = (
        next((p for p in sorted(path.rglob("*")) if p.is_file()), path) if path.is_dir() else path
    )
    fields = _first_line(sample).split(delimiter)
    names = None
    if fields and all(_is_number(f) for f in fields):
        if not headerless:
            raise ScoringError(f"{sample}: the first line holds no column names; add a header row")
        names = [
            *headerless[: len(fields)],
            *(f"column{i}" for i in range(len(headerless), len(fields))),
        ]
    return {
        "parse_options": pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
        "read_options": pacsv.ReadOptions(column_names=names),
        "convert_options": pacsv.ConvertOptions(column_types=types, strings_can_be_null=True),
    }


@dataclass(frozen=True)
class TableInput:
    """A table file (or a folder of them), opened and checked, read in fixed-size chunks."""

    path: Path
    format: str
    dataset: ds.Dataset
    csv_options: dict[str, Any]  # for CSV and TSV: how pyarrow parses it

    @property
    def schema(self) -> pa.Schema:
        return self.dataset.schema

    @property
    def rows(self) -> int | None:
        """Row count when the format says it without a scan (Parquet), else None."""
        if self.format != "parquet":
            return None
        return sum(f.metadata.num_rows for f in self.dataset.get_fragments())

    def chunks(self, columns: list[str], chunk_rows: int) -> Iterator[pa.Table]:
        """The chosen columns plus ROW, in chunks of exactly chunk_rows rows (the last may
        be shorter), in file order."""
        batches = self._batches(columns, chunk_rows)
        pending: list[pa.RecordBatch] = []
        held, start = 0, 0
        try:
            for batch in batches:
                pending.append(batch)
                held += len(batch)
                while held >= chunk_rows:
                    table = pa.Table.from_batches(pending)
                    yield _numbered(table.slice(0, chunk_rows), start)
                    rest = table.slice(chunk_rows)
                    pending, held, start = rest.to_batches(), len(rest), start + chunk_rows
        except (pa.ArrowInvalid, OSError) as exc:
            raise ScoringError(f"{self.path}: cannot be read as {self.format} ({exc})") from exc
        if held:
            yield _numbered(
                pa.Table.from_batches(pending, schema=self.chunk_schema(columns)), start
            )

    def _batches(self, columns: list[str], rows: int) -> Iterator[pa.RecordBatch]:
        """Record batches of at most `rows` rows, in file order. Parquet is read file by
        file with ParquetFile: the dataset scanner decodes ahead, and peaked at 220-320
        MiB over the start on 100,000 rows of 784-value lists, against a flat 140."""
        if self.format != "parquet":
            yield from self.dataset.to_batches(
                columns=columns, batch_size=rows, batch_readahead=READAHEAD, fragment_readahead=1
            )
            return
        for path in self.dataset.files:
            with pq.ParquetFile(path) as parquet:
                yield from parquet.iter_batches(batch_size=rows, columns=columns, use_threads=False)

    def chunk_schema(self, columns: list[str]) -> pa.Schema:
        return pa.schema([self.schema.field(c) for c in columns])


def _numbered(table: pa.Table, start: int) -> pa.Table:
    return table.append_column(ROW, pa.array(range(start, start + len(table)), pa.int64()))


def open_table(
    path: Path,
    fmt: str,
    *,
    headerless: tuple[str, ...] = (),
    types: dict[str, pa.DataType] | None = None,
) -> TableInput:
    """Open a table input and read its schema, so that a missing or unreadable file stops
    the job before any work, with a message naming it."""
    if not path.exists():
        raise ScoringError(f"input {path}: no such file or folder")
    if not os.access(path, os.R_OK):
        raise ScoringError(f"input {path}: not readable (permission denied)")
    csv_options: dict[str, Any] = {}
    try:
        if fmt == "parquet":
            file_format: Any = ds.ParquetFileFormat()
        elif fmt == "jsonl":
            file_format = ds.JsonFileFormat()
        else:
            csv_options = _csv_options(path, "\t" if fmt == "tsv" else ",", headerless, types or {})
            file_format = ds.CsvFileFormat(**csv_options)
        # Opening reads the schema (Parquet's footer; the first block of CSV and JSON), so
        # a file in another format fails here, not mid-job.
        dataset = ds.dataset(str(path), format=file_format)
        if not dataset.files:
            raise ScoringError(f"input {path}: the folder holds no {fmt} files")
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise ScoringError(f"input {path}: cannot be read as {fmt} ({exc})") from exc
    return TableInput(path, fmt, dataset, csv_options)


def require_columns(table: TableInput, wanted: dict[str, str], how: str) -> None:
    """Stop when a column the job needs is missing; the message lists what the file has."""
    missing = [
        f"{name!r} ({role})" for role, name in wanted.items() if name not in table.schema.names
    ]
    if missing:
        raise ScoringError(
            f"input {table.path}: no column {', '.join(missing)}; it has "
            f"{', '.join(table.schema.names)}. {how}"
        )


def _as_json_text(column: pa.ChunkedArray) -> pa.Array:
    return pa.array(
        [None if v is None else orjson.dumps(v).decode() for v in column.to_pylist()], pa.string()
    )


def for_csv(table: pa.Table) -> pa.Table:
    """Nested columns (lists, structs) as JSON text, which CSV can hold."""
    for i, field in enumerate(table.schema):
        if pa.types.is_nested(field.type):
            table = table.set_column(i, field.name, _as_json_text(table.column(i)))
    return table


class TableWriter:
    """Writes batches to one file in a format; `close()` flushes and fsyncs it."""

    def __init__(self, path: Path, fmt: str, schema: pa.Schema) -> None:
        self.path, self.format = path, fmt
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._writer: Any = None
        if fmt == "parquet":
            self._writer = pq.ParquetWriter(self._file, schema)
        elif fmt in ("csv", "tsv"):
            csv_schema = for_csv(schema.empty_table()).schema
            self._writer = pacsv.CSVWriter(
                self._file,
                csv_schema,
                write_options=pacsv.WriteOptions(delimiter="\t" if fmt == "tsv" else ","),
            )

    def write(self, table: pa.Table) -> None:
        if self.format == "parquet":
            self._writer.write_table(table)
        elif self.format in ("csv", "tsv"):
            self._writer.write_table(for_csv(table))
        else:
            self._file.write(b"".join(orjson.dumps(row) + b"\n" for row in table.to_pylist()))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
