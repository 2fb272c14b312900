"""MovieLens ratings in either of GroupLens's two layouts, read with the stdlib and numpy.

- **MovieLens 100K** (`ml-100k/`): `u.data` (user, movie, rating 1-5, timestamp; tabs),
  `u.item` (latin-1, `|`-separated, movie id and title first) and the standard 80/20
  split `u1.base` / `u1.test`, which training and evaluation use.
- **Newer releases** (`ml-latest-small/`, `ml-25m/`, ...): `ratings.csv`
  (`userId,movieId,rating,timestamp`, half stars 0.5-5.0) and `movies.csv`
  (`movieId,title,genres`, UTF-8, quoted titles). They come with no split, so one is drawn
  as u1 was (20 % of the ratings held out), by a hash of (user, movie): the same rating is
  always on the same side, whatever the file's order.

Half stars map onto the model's five rating levels by rounding up: 0.5 and 1.0 → 1,
1.5 and 2.0 → 2, ..., 4.5 and 5.0 → 5 (`dlserve.preprocess.ratings.rating_level`).

Missing 100K files are taken from the official `ml-100k.zip`, checked against the MD5
GroupLens publishes beside it. Their licence forbids redistributing the files, so the
project never bundles them: it downloads them or reads a folder the user points it at.
"""

from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlserve.hashing import sha256_file
from dlserve.preprocess.ratings import LEVELS, Ratings, rating_level
from readers.download import DataError, RemoteFile, fetch

ARCHIVE = "ml-100k.zip"
ARCHIVE_MD5 = "0e33842e24a9c977be4e0107933c0723"  # files.grouplens.org/.../ml-100k.zip.md5
ML100K_FILES = ("u.data", "u.item", "u1.base", "u1.test")
CSV_FILES = ("ratings.csv", "movies.csv")
TEST_SHARE = 5  # the CSV split holds out one rating in five, as u1.test does


@dataclass(frozen=True)
class MovieLens:
    movie_ids: np.ndarray  # int64 [M], the catalogue in file order
    titles: list[str]  # [M]
    train: Ratings
    test: Ratings
    layout: str  # "ml-100k (u1.base/u1.test)" or "ratings.csv (hashed 80/20 split)"
    files: dict[str, str]  # file name -> sha256, recorded in the model manifest


def read_ratings_tsv(path: Path) -> Ratings:
    """`u.data`, `u1.base`, `u1.test`: user, movie, rating 1-5, timestamp, tab-separated."""
    rows: list[tuple[int, int, int]] = []
    with path.open(encoding="ascii", errors="strict") as f:
        try:
            for line_no, line in enumerate(f, start=1):
                fields = line.rstrip("\n").split("\t")
                if len(fields) != 4:
                    raise DataError(
                        f"{path}:{line_no}: expected 4 tab-separated fields "
                        f"(user, movie, rating, timestamp), got {len(fields)}"
                    )
                try:
                    user, movie, rating = int(fields[0]), int(fields[1]), int(fields[2])
                except ValueError:
                    raise DataError(
                        f"{path}:{line_no}: user, movie and rating must be "
                        f"whole numbers, got {fields[:3]!r}"
                    ) from None
                if not 1 <= rating <= LEVELS:
                    raise DataError(f"{path}:{line_no}: rating must be 1 to 5, got {rating}")
                rows.append((user, movie, rating))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not a MovieLens ratings file ({exc})") from None
    return _ratings(rows, path)


def read_items(path: Path) -> tuple[np.ndarray, list[str]]:
    """`u.item`: latin-1, `|`-separated; the movie id and title come first."""
    ids, titles = [], []
    with path.open(encoding="latin-1") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.rstrip("\n").split("|")
            if len(fields) < 2 or not fields[0].isdigit():
                raise DataError(
                    f"{path}:{line_no}: expected 'movie id|title|...', got {line[:60]!r}"
                )
            ids.append(int(fields[0]))
            titles.append(fields[1])
    return _catalogue(ids, titles, path)


def read_ratings_csv(path: Path) -> Ratings:
    """`ratings.csv`: header userId,movieId,rating,timestamp; ratings 0.5-5.0 in half stars."""
    rows: list[tuple[int, int, int]] = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or header[:3] != ["userId", "movieId", "rating"]:
            raise DataError(
                f"{path}:1: should be the header 'userId,movieId,rating,timestamp', got {header!r}"
            )
        for line_no, row in enumerate(reader, start=2):
            try:
                rows.append((int(row[0]), int(row[1]), rating_level(float(row[2]))))
            except (ValueError, IndexError) as exc:
                raise DataError(f"{path}:{line_no}: {exc} in {row!r}") from None
    return _ratings(rows, path)


def read_movies_csv(path: Path) -> tuple[np.ndarray, list[str]]:
    """`movies.csv`: header movieId,title,genres; titles with commas are quoted."""
    ids, titles = [], []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or header[:2] != ["movieId", "title"]:
            raise DataError(
                f"{path}:1: should be the header 'movieId,title,genres', got {header!r}"
            )
        for line_no, row in enumerate(reader, start=2):
            if len(row) < 2 or not row[0].isdigit():
                raise DataError(f"{path}:{line_no}: expected 'movieId,title,genres', got {row!r}")
            ids.append(int(row[0]))
            titles.append(row[1])
    return _catalogue(ids, titles, path)


def _ratings(rows: list[tuple[int, int, int]], path: Path) -> Ratings:
    if not rows:
        raise DataError(f"{path}: no ratings")
    a = np.asarray(rows, dtype=np.int64)
    return Ratings(a[:, 0], a[:, 1], a[:, 2].astype(np.int8))


def _catalogue(ids: list[int], titles: list[str], path: Path) -> tuple[np.ndarray, list[str]]:
    if not ids:
        raise DataError(f"{path}: no movies")
    movie_ids = np.asarray(ids, dtype=np.int64)
    if len(np.unique(movie_ids)) != len(movie_ids):
        raise DataError(f"{path}: a movie id appears twice")
    return movie_ids, titles


def _check_known(ratings: Ratings, movie_ids: np.ndarray, path: Path) -> None:
    unknown = np.setdiff1d(ratings.movies, movie_ids)
    if len(unknown):
        raise DataError(
            f"{path}: {len(unknown)} movie id(s) not in the movie list, e.g. {unknown[:5].tolist()}"
        )


def hashed_test_rows(ratings: Ratings) -> np.ndarray:
    """Boolean [R]: which ratings the CSV layout holds out, by a fixed hash of (user, movie)."""
    x = (ratings.users.astype(np.uint64) << np.uint64(32)) ^ ratings.movies.astype(np.uint64)
    # splitmix64's finaliser: every input bit moves every output bit.
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x % np.uint64(TEST_SHARE)) == 0


def _extract(archive: Path, folder: Path) -> None:
    """Copy the four files this project reads out of the GroupLens archive, by name."""
    try:
        with zipfile.ZipFile(archive) as z:
            for name in ML100K_FILES:
                tmp = folder / f"{name}.part"
                tmp.write_bytes(z.read(f"ml-100k/{name}"))
                tmp.replace(folder / name)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{archive}: not the MovieLens 100K archive ({exc})") from exc


def load_movielens(folder: Path, *, url: str | None = None) -> MovieLens:
    """Read a MovieLens folder in either layout; `url` set means missing 100K files are
    downloaded (the archive) from there."""
    if all((folder / n).is_file() for n in CSV_FILES):
        return _load_csv(folder)
    if not all((folder / n).is_file() for n in ML100K_FILES):
        if url is None:
            raise DataError(
                f"no MovieLens files in {folder}: expected {', '.join(ML100K_FILES)}"
                f" (MovieLens 100K) or {' and '.join(CSV_FILES)} (newer releases)"
            )
        archive = folder / ARCHIVE
        if not archive.is_file():
            archive = fetch(RemoteFile(ARCHIVE, url, "md5:" + ARCHIVE_MD5), folder)
        _extract(archive, folder)
    movie_ids, titles = read_items(folder / "u.item")
    train = read_ratings_tsv(folder / "u1.base")
    test = read_ratings_tsv(folder / "u1.test")
    for name, part in (("u1.base", train), ("u1.test", test)):
        _check_known(part, movie_ids, folder / name)
    return MovieLens(
        movie_ids,
        titles,
        train,
        test,
        "ml-100k (u1.base/u1.test)",
        {n: sha256_file(folder / n) for n in ("u.item", "u1.base", "u1.test")},
    )


def _load_csv(folder: Path) -> MovieLens:
    movie_ids, titles = read_movies_csv(folder / "movies.csv")
    ratings = read_ratings_csv(folder / "ratings.csv")
    _check_known(ratings, movie_ids, folder / "ratings.csv")
    held_out = hashed_test_rows(ratings)
    return MovieLens(
        movie_ids,
        titles,
        ratings.take(~held_out),
        ratings.take(held_out),
        "ratings.csv (1 in 5 ratings held out by a hash of user and movie)",
        {n: sha256_file(folder / n) for n in CSV_FILES},
    )
