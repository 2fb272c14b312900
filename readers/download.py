"""Downloads of the official data files, verified by checksum before they are kept (pooch).

pooch fetches a file to a temporary name beside its destination, checks its hash, and
moves it into place only when the digest matches, so a failed or tampered download never
leaves a file that a later run would trust. This module turns its failures into a
`DataError` that says what to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pooch
import requests

log = logging.getLogger(__name__)

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
    dest = dest_dir / remote.name
    log.info("downloading %s from %s", remote.name, remote.url)
    downloader = pooch.HTTPDownloader(progressbar=progress, timeout=TIMEOUT_S)
    try:
        path = pooch.retrieve(
            remote.url,
            known_hash=remote.checksum,
            fname=remote.name,
            path=dest_dir,
            downloader=downloader,
        )
    except ValueError as exc:  # pooch's hash mismatch; the file is not kept
        algorithm, _, expected = remote.checksum.partition(":")
        raise DataError(
            f"checksum mismatch for {remote.name} from {remote.url}: expected {algorithm} "
            f"{expected} ({exc}); the file was discarded"
        ) from None
    except (requests.RequestException, OSError) as exc:
        raise DataError(
            f"could not download {remote.name} from {remote.url} ({exc}). "
            f"Offline? Put the file at {dest} yourself, or point the URL at a mirror."
        ) from exc
    return Path(path)
