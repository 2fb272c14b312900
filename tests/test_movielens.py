"""MovieLens reading (both layouts), downloading, and the one rating encoding."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from dlserve.preprocess.ratings import Catalogue, UserRatings, by_user, one_hot
from readers.download import DataError
from readers.movielens import (
    hashed_test_rows,
    load_movielens,
    rating_level,
    read_ratings_csv,
    read_ratings_tsv,
)
from tests.movielens_files import write_csv_release


def test_ml100k_u1_split_and_latin1_titles(data_dir: Path) -> None:
    ml = load_movielens(data_dir / "ml-100k")
    assert len(ml.movie_ids) == 1682 and len(ml.train) == 80_000 and len(ml.test) == 20_000
    assert ml.titles[0] == "Toy Story (1995)"
    assert "Ã" not in "".join(ml.titles) and any("é" in t for t in ml.titles)  # latin-1 read
    assert set(np.unique(ml.train.levels)) == {1, 2, 3, 4, 5}
    assert set(ml.files) == {"u.item", "u1.base", "u1.test"}


@pytest.mark.parametrize(
    "stars, level", [(0.5, 1), (1, 1), (1.5, 2), (3.0, 3), (3.5, 4), (4.5, 5), (5, 5)]
)
def test_half_stars_round_up(stars: float, level: int) -> None:
    assert rating_level(stars) == level


@pytest.mark.parametrize("stars", [0, 0.25, 5.5, 3.7, float("nan")])
def test_rating_level_rejects_what_is_not_a_star_rating(stars: float) -> None:
    with pytest.raises(ValueError, match="0.5 to 5 in steps of 0.5"):
        rating_level(stars)


@pytest.mark.parametrize(
    "content, message",
    [
        ("1\t2\t3\n", r":1: expected 4 tab-separated fields"),
        ("1\t2\t3\t4\n1\tx\t3\t4\n", r":2: user, movie and rating must be whole numbers"),
        ("1\t2\t6\t4\n", r":1: rating must be 1 to 5, got 6"),
    ],
)
def test_tsv_errors_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "u1.base"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_ratings_tsv(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("user,movie,rating\n", r":1: should be the header"),
        ("userId,movieId,rating,timestamp\n1,2,4.5,9\n1,3,7,9\n", r":3: .*0.5 to 5"),
        ("userId,movieId,rating,timestamp\n1,2\n", r":2: "),
    ],
)
def test_csv_errors_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_ratings_csv(path)


def test_csv_release_reads_with_a_stable_hashed_split(tmp_path: Path) -> None:
    write_csv_release(tmp_path / "ml-small")
    ml = load_movielens(tmp_path / "ml-small")
    total = len(ml.train) + len(ml.test)
    assert total == 120 * 30 and 0.15 < len(ml.test) / total < 0.25
    assert "ratings.csv" in ml.layout and ml.titles[0].startswith("Film 3, the Sci-Fi")
    # The split depends on (user, movie) only, not on the file's order.
    shuffled = ml.train.take(np.random.default_rng(1).permutation(len(ml.train)))
    assert not hashed_test_rows(shuffled).any() and hashed_test_rows(ml.test).all()


def test_ratings_for_unknown_movies_are_refused(tmp_path: Path) -> None:
    write_csv_release(tmp_path / "ml", movies=6, users=3)
    with (tmp_path / "ml" / "ratings.csv").open("a") as f:
        f.write("1,999,4.0,1\n")
    with pytest.raises(DataError, match=r"1 movie id\(s\) not in the movie list, e.g. \[999\]"):
        load_movielens(tmp_path / "ml")


def test_missing_folder_says_which_files_are_expected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="u.data, u.item, u1.base, u1.test .* ratings.csv"):
        load_movielens(tmp_path / "nothing")


def _ml100k_archive(data_dir: Path, dest: Path) -> None:
    with zipfile.ZipFile(dest, "w") as z:
        for name in ("u.data", "u.item", "u1.base", "u1.test"):
            z.write(data_dir / "ml-100k" / name, f"ml-100k/{name}")


def test_ml100k_archive_in_the_folder_is_unpacked(data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    _ml100k_archive(data_dir, folder / "ml-100k.zip")
    ml = load_movielens(folder, url="http://127.0.0.1:9/ml-100k.zip")
    assert len(ml.test) == 20_000
    assert (folder / "u1.test").read_bytes() == (data_dir / "ml-100k" / "u1.test").read_bytes()


def test_ml100k_download_insists_on_the_official_archive(
    http_mirror, data_dir: Path, tmp_path: Path
) -> None:
    url, root = http_mirror
    _ml100k_archive(data_dir, root / "ml-100k.zip")  # same files, not GroupLens's zip bytes
    with pytest.raises(DataError, match="checksum mismatch .* expected md5 0e33842e"):
        load_movielens(tmp_path / "ml-100k", url=url + "ml-100k.zip")
    assert list((tmp_path / "ml-100k").iterdir()) == []


def test_one_hot_marks_each_rating_and_leaves_unrated_movies_empty() -> None:
    users = [
        UserRatings(np.array([2, 0]), np.array([5, 1], np.int8)),
        UserRatings(np.empty(0, np.int64), np.empty(0, np.int8)),
    ]
    v = one_hot(users, 4)
    assert v.shape == (2, 4, 5) and v.dtype == np.float32
    assert v[0, 2, 4] == 1 and v[0, 0, 0] == 1 and v.sum() == 2 and not v[1].any()


def test_catalogue_positions_and_grouping_by_user(data_dir: Path) -> None:
    ml = load_movielens(data_dir / "ml-100k")
    cat = Catalogue(ml.movie_ids, ml.titles, np.zeros(len(ml.movie_ids)))
    assert cat.positions(np.array([1, 1682, 0, 5000])).tolist() == [0, 1681, -1, -1]
    users = by_user(ml.train, cat)
    assert len(users) == 943 and sum(len(u) for u in users.values()) == 80_000
    first = ml.train.users == 1
    assert sorted(cat.movie_ids[users[1].movies]) == sorted(ml.train.movies[first])
