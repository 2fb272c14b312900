"""Downloads of the official data files, verified by checksum before they are kept.

A file is fetched to a temporary name beside its destination, hashed while it streams,
and renamed into place only when the digest matches, so a failed or tampered download
never leaves a file that a later run would trust.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

CHUNK = 1 << 16
TIMEOUT_S = 60


class DataError(RuntimeError):
    """A data file is missing, malformed or could not be fetched; the message says what to do."""


@dataclass(frozen=True)
class RemoteFile:
    name: str  # file name in the data directory
    url: str
    checksum: str  # "md5:<hex>" or "sha256:<hex>", as the publisher lists it


def fetch(remote: RemoteFile, dest_dir: Path, *, progress: bool = True) -> Path:
    """Download `remote` into `dest_dir` and verify it; return the file's path."""
    algorithm, _, expected = remote.checksum.partition(":")
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / remote.name
    tmp = dest.with_name(dest.name + ".part")
    h = hashlib.new(algorithm)
    log.info("downloading %s from %s", remote.name, remote.url)
    try:
        with urllib.request.urlopen(remote.url, timeout=TIMEOUT_S) as resp, tmp.open("wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=remote.name,
                      disable=not progress, leave=False) as bar:
                while chunk := resp.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"could not download {remote.name} from {remote.url} ({exc}). "
            f"Offline? Put the file at {dest} yourself, or point the URL at a mirror."
        ) from exc
    if h.hexdigest() != expected:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"checksum mismatch for {remote.name} from {remote.url}: expected {algorithm} "
            f"{expected}, got {h.hexdigest()}; the file was discarded"
        )
    os.replace(tmp, dest)
    return dest
