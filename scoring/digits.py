"""Batch scoring for the digits model: what `dlserve score digits` reads and writes.

Inputs: a table with a `pixels` column (784 values 0-255 per row, row by row: a list or
fixed-size list, as pyarrow writes a NumPy array, or 784 bytes) or an `image` column
(PNG/JPEG bytes); an MNIST IDX image file (the id is the image's index); or a folder of
image files (the id is the file's path in the folder); or a payload log (`REPLAY`,
scoring/payloads.py). Pixel lists go through `/digits/predict`'s checks (`parse_images`;
uint8 ones, like 784 bytes, need none, as in the route's base64 form), image bytes through
`/digits/predict_image`'s (`prepare_file`), and the answer's fields are the HTTP answer's:
`digit`, `confidence`, `probabilities`.
"""

from __future__ import annotations

import base64
import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dlserve.errors import InputError
from dlserve.models import digits
from dlserve.preprocess.images import SIDE
from dlserve.settings import Settings
from scoring.adapters import Job, Plan, Scored, check_each, column_role, reason
from scoring.errors import ScoringError
from scoring.formats import ROW, TableInput, detect, fingerprint, open_table, require_columns
from scoring.payloads import Item, Replay, ReplayPart, json_field, paired, tensor

PIXELS = SIDE * SIDE
FIELDS = pa.schema(
    [
        pa.field("digit", pa.int64()),
        pa.field("confidence", pa.float64()),
        pa.field("probabilities", pa.list_(pa.float64())),
    ]
)
IDX_MAGIC = b"\x00\x00\x08\x03"  # unsigned bytes, 3 dimensions
HOW = (
    "Digits read a `pixels` column (784 values 0-255 per row) or an `image` column (PNG or "
    "JPEG bytes); name yours with --column pixels=NAME or --column image=NAME."
)


def _is_idx(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        with gzip.open(path) as g:
            head = g.read(4)
    return head == IDX_MAGIC


def _is_bytes(kind: pa.DataType) -> bool:
    return (
        pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_fixed_size_binary(kind)
    )


class DigitsPlan(Plan):
    fields = FIELDS

    def __init__(self, job: Job, settings: Settings, kind: str, column: str) -> None:
        self.job, self.settings = job, settings
        self.kind, self.column = kind, column  # kind: "pixels" or "image"
        self.id_column = job.id_column or "id"

    def score(self, runner: Any, chunk: pa.Table) -> Scored:
        col = chunk.column(self.column).combine_chunks()
        missing = col.is_null().to_numpy(zero_copy_only=False)
        rejects = [(int(i), f"{self.column}: missing") for i in np.flatnonzero(missing)]
        present = np.flatnonzero(~missing)
        if self.kind == "pixels":
            good, bad, pixels = self._pixels(col, present)
        else:
            good, bad, pixels = self._images(col, present)
        rejects = sorted(rejects + bad)
        probs = (
            np.concatenate(
                [
                    runner.run_batch([pixels[i : i + self.job.batch_size]])[0]
                    for i in range(0, len(good), self.job.batch_size)
                ]
            )
            if good
            else np.empty((0, 10), np.float32)
        )
        digit, confidence, probabilities = digits.prediction_arrays(probs)
        return Scored(
            np.asarray(good, np.int64),
            {
                "digit": pa.array(digit, pa.int64()),
                "confidence": pa.array(confidence, pa.float64()),
                "probabilities": pa.FixedSizeListArray.from_arrays(
                    pa.array(probabilities.reshape(-1), pa.float64()), 10
                ).cast(pa.list_(pa.float64())),
            },
            rejects,
        )

    def _bytes(
        self, col: pa.Array, present: np.ndarray
    ) -> tuple[list[int], list[tuple[int, str]], np.ndarray]:
        """Rows of 784 bytes (raw uint8 pixels) → [N, 28, 28], as /digits/predict's compact
        form takes them (its base64 strings are these bytes); another length is refused in
        that form's words."""
        lengths = pc.binary_length(col).fill_null(0).to_numpy(zero_copy_only=False)
        sized = present[lengths[present] == PIXELS]
        bad = []
        for i in present[lengths[present] != PIXELS]:
            try:
                digits.parse_images_base64(
                    [base64.b64encode(col[int(i)].as_py()).decode()], max_items=1
                )
            except InputError as exc:
                bad.append((int(i), reason(exc, "images_base64", self.column)))
        raw = b"".join(col.take(pa.array(sized)).to_pylist())
        return sized.tolist(), bad, np.frombuffer(raw, np.uint8).reshape(len(sized), SIDE, SIDE)

    def _pixels(
        self, col: pa.Array, present: np.ndarray
    ) -> tuple[list[int], list[tuple[int, str]], np.ndarray]:
        """Rows of 784 values → [N, 28, 28] through /digits/predict's checks; a row of
        another length is refused with that route's shape message."""
        if _is_bytes(col.type):
            return self._bytes(col, present)
        if pa.types.is_fixed_size_list(col.type):
            lengths = np.full(len(col), col.type.list_size)
        else:
            lengths = col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        sized = present[lengths[present] == PIXELS]
        odd = present[lengths[present] != PIXELS]
        check = self._check(lambda xs: digits.parse_images(xs, max_items=max(1, len(xs))))
        # Refused by shape, every one of them (parse_images says how).
        _, refused, _ = check([np.asarray(col[int(i)].as_py(), dtype=object) for i in odd])
        bad = [(int(odd[i]), why) for i, why in refused]
        taken = col if len(sized) == len(col) else col.take(pa.array(sized))
        values = taken.flatten()
        if pa.types.is_uint8(values.type) and values.null_count == 0:
            # uint8 pixels are 0-255 by their type: nothing to check, as in /digits/predict's
            # compact form (parse_images_base64); the runner takes them as they are.
            return sized.tolist(), bad, values.to_numpy().reshape(len(sized), SIDE, SIDE)
        rows = list(values.to_numpy(zero_copy_only=False).reshape(len(sized), SIDE, SIDE))
        ok, refused, pixels = check(rows)
        return (
            [int(sized[i]) for i in ok],
            sorted(bad + [(int(sized[i]), r) for i, r in refused]),
            pixels if pixels is not None else np.empty((0, SIDE, SIDE), np.float32),
        )

    def _check(self, parse: Any) -> Any:
        return lambda rows: check_each(rows, parse, lambda exc: reason(exc, "images", self.column))

    def _images(
        self, col: pa.Array, present: np.ndarray
    ) -> tuple[list[int], list[tuple[int, str]], np.ndarray]:
        """PNG/JPEG bytes → [N, 28, 28] through /digits/predict_image's preprocessing."""
        good, bad, parts = [], [], []
        for i in present.tolist():
            try:
                parts.append(digits.prepare_file(None, col[i].as_py(), self.settings).part)
            except InputError as exc:
                bad.append((i, reason(exc, ("body", "image"), self.column)))
            else:
                good.append(i)
        return good, bad, np.concatenate(parts) if parts else np.empty((0, SIDE, SIDE))


class TablePlan(DigitsPlan):
    def __init__(self, job: Job, settings: Settings, table: TableInput) -> None:
        names = table.schema.names
        pixels = column_role(job, "pixels", "pixels", names)
        image = column_role(job, "image", "image", names)
        kind, column = (
            ("image", image) if pixels not in names and image in names else ("pixels", pixels)
        )
        super().__init__(job, settings, kind, column)
        require_columns(
            table,
            {"id": self.id_column, kind: column},
            f"{HOW} The id column is `id` unless --id-column says otherwise.",
        )
        self.table = table
        self.id_type = table.schema.field(self.id_column).type
        self.rows = table.rows

    def identity(self) -> dict[str, Any]:
        return {
            "input": fingerprint(self.table.path),
            "format": self.table.format,
            "id": self.id_column,
            "column": self.column,
        }

    def chunks(self, chunk_rows: int) -> Iterator[pa.Table]:
        return self.table.chunks([self.id_column, self.column], chunk_rows)

    def ray_source(self) -> tuple[TableInput, list[str], str | None]:
        return self.table, [self.id_column, self.column], None


class IdxPlan(DigitsPlan):
    """An MNIST IDX image file; the id is the image's position in it."""

    id_type = pa.int64()

    def __init__(self, job: Job, settings: Settings) -> None:
        super().__init__(job, settings, "pixels", "pixels")
        from readers.download import DataError
        from readers.mnist import read_idx

        try:
            self.images = read_idx(job.input)
        except DataError as exc:
            raise ScoringError(f"input {job.input}: {exc}") from None
        if self.images.shape[1:] != (SIDE, SIDE):
            raise ScoringError(
                f"input {job.input}: IDX images of shape "
                f"{self.images.shape[1:]}; digits reads 28×28"
            )
        self.rows = len(self.images)

    def identity(self) -> dict[str, Any]:
        return {"input": fingerprint(self.job.input), "format": "idx", "id": self.id_column}

    def chunks(self, chunk_rows: int) -> Iterator[pa.Table]:
        flat = self.images.reshape(len(self.images), PIXELS)
        for start in range(0, len(flat), chunk_rows):
            part = flat[start : start + chunk_rows]
            index = pa.array(np.arange(start, start + len(part)), pa.int64())
            yield pa.table(
                {
                    self.id_column: index,
                    "pixels": pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), PIXELS),
                    ROW: index,
                }
            )


@dataclass(frozen=True)
class ImageFile:
    id: str
    path: Path


class FolderPlan(DigitsPlan):
    """A folder of image files (searched recursively); the id is the file's path in it."""

    id_type = pa.string()

    def __init__(self, job: Job, settings: Settings) -> None:
        super().__init__(job, settings, "image", "image")
        self.files = [
            ImageFile(str(p.relative_to(job.input)), p)
            for p in sorted(job.input.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        ]
        if not self.files:
            raise ScoringError(f"input {job.input}: the folder holds no files")
        self.rows = len(self.files)

    def identity(self) -> dict[str, Any]:
        return {"input": fingerprint(self.job.input), "format": "images", "id": self.id_column}

    def chunks(self, chunk_rows: int) -> Iterator[pa.Table]:
        for start in range(0, len(self.files), chunk_rows):
            files = self.files[start : start + chunk_rows]
            yield pa.table(
                {
                    self.id_column: [f.id for f in files],
                    "image": pa.array([_read(f.path) for f in files], pa.binary()),
                    ROW: pa.array(range(start, start + len(files)), pa.int64()),
                }
            )


def _read(path: Path) -> bytes:
    """A file's bytes; an unreadable file becomes empty bytes, which the route refuses
    ("image: empty")."""
    try:
        return path.read_bytes()
    except OSError:
        return b""


class DigitsReplay(ReplayPart, DigitsPlan):
    """The rows of a replayed payload log (scoring/payloads.py) that fill one column."""

    id_type = pa.string()


def _logged_inputs(route: str, inputs: Any) -> list[dict[str, Any]] | None:
    """A logged request's images as replay columns: `pixels` (784 values) for the arrays
    and the protocol's tensors, `image` (the file's bytes) for /digits/predict_image."""
    if route.endswith("/predict_image"):
        if isinstance(inputs, dict) and isinstance(inputs.get("base64"), str):
            return [{"image": base64.b64decode(inputs["base64"])}]
        return None
    images = json_field(inputs, "images")
    if images is None and (packed := json_field(inputs, "images_base64")) is not None:
        images = [list(base64.b64decode(b)) for b in packed]
    if images is None:
        images = tensor(json_field(inputs, "inputs"), "pixels")
    if images is None:
        return None
    flat = np.asarray(images, np.float64).reshape(-1, PIXELS)
    return [{"pixels": row} for row in flat.tolist()]


def _logged_answers(outputs: Any) -> list[dict[str, Any]] | None:
    """The answers a logged response gave, in batch scoring's columns."""
    predictions = json_field(outputs, "predictions")
    if predictions is not None:
        return [{k: p[k] for k in ("digit", "confidence", "probabilities")} for p in predictions]
    probabilities = tensor(json_field(outputs, "outputs"), "probabilities")
    if probabilities is None:
        return None
    digit, confidence, rounded = digits.prediction_arrays(
        np.asarray(probabilities, np.float64).reshape(-1, 10)
    )
    return [
        {"digit": int(d), "confidence": float(c), "probabilities": p.tolist()}
        for d, c, p in zip(digit, confidence, rounded, strict=True)
    ]


def _unpack(route: str, inputs: Any, outputs: Any) -> list[Item] | None:
    return paired(_logged_inputs(route, inputs), _logged_answers(outputs))


def _label_confidence(answers: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    return (
        answers.column("digit").to_numpy(zero_copy_only=False),
        answers.column("confidence").to_numpy(zero_copy_only=False),
    )


REPLAY = Replay(
    columns=pa.schema([pa.field("pixels", pa.list_(pa.float64())), pa.field("image", pa.binary())]),
    unpack=_unpack,
    plans=lambda job, settings: {
        "pixels": DigitsReplay(job, settings, "pixels", "pixels"),
        "image": DigitsReplay(job, settings, "image", "image"),
    },
    label_confidence=_label_confidence,
    fields=FIELDS,
)


class DigitsScorer:
    replay = REPLAY

    def plan(self, job: Job, settings: Settings) -> Plan:
        if not job.input.exists():
            raise ScoringError(f"input {job.input}: no such file or folder")
        if _is_idx(job.input):
            return IdxPlan(job, settings)
        if job.input.is_dir() and not job.input_format:
            try:
                detect(job.input, None)
            except ScoringError:  # not a folder of table files: a folder of images
                return FolderPlan(job, settings)
        fmt = detect(job.input, job.input_format)
        return TablePlan(job, settings, open_table(job.input, fmt))


SCORER = DigitsScorer()
