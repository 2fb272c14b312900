"""SST-2 (Stanford Sentiment Treebank, binary) in its GLUE TSV layout, read with the stdlib.

Layout: `<data_dir>/sst2/{train,dev}.tsv`, each with the header `sentence<TAB>label` and
labels 0 (negative) / 1 (positive). The train file holds 67,349 phrases (every sub-phrase
of the treebank's training sentences), dev 872 whole sentences. Missing files are taken
from the official GLUE `SST-2.zip`, downloaded and checked against the MD5 that torchtext
publishes for it, unless offline.
"""

from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from dlserve.hashing import sha256_file
from readers.download import DataError, RemoteFile, fetch

SUBDIR = "sst2"
ARCHIVE = "SST-2.zip"
ARCHIVE_MD5 = "9f81648d4199384278b86e315dac217c"
HEADER = ["sentence", "label"]
LABELS = ["negative", "positive"]
Split = Literal["train", "dev"]


@dataclass(frozen=True)
class Sst2Split:
    texts: list[str]
    labels: np.ndarray  # int64 [N], 0 = negative, 1 = positive
    files: dict[str, str]  # file name -> sha256, recorded in the model manifest


def read_tsv(path: Path) -> tuple[list[str], np.ndarray]:
    """Read one GLUE SST-2 file; DataError names the line of the first malformed row."""
    texts: list[str] = []
    labels: list[int] = []
    try:
        with path.open(encoding="utf-8", newline="") as f:
            # QUOTE_NONE: the treebank's text holds bare quote characters (`` '' ").
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(rows, None)
            if header != HEADER:
                raise DataError(
                    f"{path}:1: should be the header 'sentence<TAB>label', got {header!r}"
                )
            for line, row in enumerate(rows, start=2):
                if len(row) != 2:
                    raise DataError(
                        f"{path}:{line}: expected 2 tab-separated fields "
                        f"(sentence, label), got {len(row)}"
                    )
                if row[1] not in ("0", "1"):
                    raise DataError(f"{path}:{line}: label must be 0 or 1, got {row[1]!r}")
                if not row[0].strip():
                    raise DataError(f"{path}:{line}: empty sentence")
                texts.append(row[0])
                labels.append(int(row[1]))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    if not texts:
        raise DataError(f"{path}: no examples after the header")
    return texts, np.asarray(labels, dtype=np.int64)


def _extract(archive: Path, folder: Path) -> None:
    """Copy train.tsv and dev.tsv out of the GLUE archive (only those two members, by name,
    so a crafted archive cannot write anywhere else)."""
    try:
        with zipfile.ZipFile(archive) as z:
            for split in ("train", "dev"):
                member = f"SST-2/{split}.tsv"
                tmp = folder / f"{split}.tsv.part"
                tmp.write_bytes(z.read(member))
                tmp.replace(folder / f"{split}.tsv")
    except (zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{archive}: not the GLUE SST-2 archive ({exc})") from exc


def _locate(data_dir: Path, split: Split, url: str | None) -> Path:
    folder = data_dir / SUBDIR
    path = folder / f"{split}.tsv"
    if path.is_file():
        return path
    if url is None:
        raise DataError(f"SST-2 file {path.name} not found in {folder}")
    archive = folder / ARCHIVE
    if not archive.is_file():
        archive = fetch(RemoteFile(ARCHIVE, url, "md5:" + ARCHIVE_MD5), folder)
    _extract(archive, folder)
    return path


def load_sst2(data_dir: Path, split: Split, *, url: str | None = None) -> Sst2Split:
    """Load a split; `url` set means a missing file is downloaded (the archive) from there."""
    path = _locate(data_dir, split, url)
    texts, labels = read_tsv(path)
    return Sst2Split(texts=texts, labels=labels, files={path.name: sha256_file(path)})
