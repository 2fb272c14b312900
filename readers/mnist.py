"""MNIST in its published IDX format (gzip or plain), read with numpy alone.

Layout: `<data_dir>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`. A missing file
is downloaded from the official mirror (MD5s as torchvision lists them) unless offline.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from dlserve.hashing import sha256_file
from readers.download import DataError, RemoteFile, fetch

SUBDIR = "mnist"
OFFICIAL_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# IDX magic: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions.
IDX_UBYTE = 0x08
Split = Literal["train", "test"]


@dataclass(frozen=True)
class MnistSplit:
    images: np.ndarray  # uint8 [N, 28, 28], ink bright on a dark background
    labels: np.ndarray  # int64 [N]
    files: dict[str, str]  # file name -> sha256, recorded in the model manifest


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file into an array of its declared shape; raise DataError if malformed."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip data ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != IDX_UBYTE:
        raise DataError(f"{path}: IDX type 0x{raw[2]:02x} unsupported, expected unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header declares shape {shape} ({expected} bytes) "
            f"but the file holds {len(raw) - header} bytes of data"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _locate(data_dir: Path, name: str, base_url: str | None) -> Path:
    """Find `name` (or its un-gzipped twin) under data_dir/mnist, downloading if allowed."""
    folder = data_dir / SUBDIR
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    if base_url is None:
        raise DataError(f"MNIST file {name} not found in {folder}")
    url = base_url.rstrip("/") + "/" + name
    return fetch(RemoteFile(name, url, "md5:" + OFFICIAL_MD5[name]), folder)


def load_mnist(data_dir: Path, split: Split, *, base_url: str | None = None) -> MnistSplit:
    """Load a split; `base_url` set means missing files are downloaded from there."""
    prefix = "train" if split == "train" else "t10k"
    images_path = _locate(data_dir, f"{prefix}-images-idx3-ubyte.gz", base_url)
    labels_path = _locate(data_dir, f"{prefix}-labels-idx1-ubyte.gz", base_url)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: expected images of shape [N, 28, 28], got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{labels_path}: {labels.shape} labels do not match {len(images)} images")
    if labels.max(initial=0) > 9:
        raise DataError(f"{labels_path}: labels must be digits 0-9")
    files = {p.name: sha256_file(p) for p in (images_path, labels_path)}
    return MnistSplit(images=images, labels=labels.astype(np.int64), files=files)
