"""Batch scoring for the recommender, in two layouts.

- A long ratings table (`user_id, movie_id, rating`: MovieLens `ratings.csv`, or `u.data`,
  which has no header row), scored per user: one output row per user with the k
  recommendations `/recommender/recommend` gives for those ratings (`--k`).
- `user_id, movie_id` pairs, with `--ratings TABLE` giving each user's ratings: one output
  row per pair with the `predicted_rating` `/recommender/predict` gives.

A user's rows may be anywhere in a ratings table (u.data is in no order), so the table is
first grouped by user (`group`): each row is checked the way the HTTP API checks a rating
(an unknown movie, a rating outside 1-5, a movie rated twice are rejected, with the API's
words), and the rows kept are grouped in memory (about 32 bytes a rating: MovieLens 25M
takes ~0.8 GB) into the job's partial work, from which users are scored chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dlserve.errors import InputError
from dlserve.models import recommender as contract
from dlserve.prepared import Prepared
from dlserve.preprocess.ratings import UserRatings
from dlserve.settings import Settings
from scoring.adapters import Job, Plan, Scored, column_role, reason
from scoring.checkpoint import PRE_REJECTS, write_parquet_atomically
from scoring.errors import ScoringError
from scoring.formats import ROW, TableInput, detect, fingerprint, open_table, require_columns

ROLES = {
    "user_id": ("user_id", "userId", "user"),
    "movie_id": ("movie_id", "movieId", "item_id"),
    "rating": ("rating",),
}
HEADERLESS = ("user_id", "movie_id", "rating", "timestamp")  # u.data's columns
GROUPED = "grouped.parquet"
FIRST_ROW = "first_row"
READ_ROWS = 1_000_000  # ratings read at a time while grouping
RAY_BLOCK_USERS = 100
RECOMMENDATION = pa.struct(
    [
        pa.field("movie_id", pa.int64()),
        pa.field("title", pa.string()),
        pa.field("predicted_rating", pa.float64()),
    ]
)
TOP_K_FIELDS = pa.schema(
    [
        pa.field("cold_start", pa.bool_()),
        pa.field("ranking", pa.string()),
        pa.field("recommendations", pa.list_(RECOMMENDATION)),
    ]
)
PAIR_FIELDS = pa.schema(
    [pa.field("cold_start", pa.bool_()), pa.field("predicted_rating", pa.float64())]
)
HOW = (
    "The recommender reads user_id, movie_id and rating columns (MovieLens's userId and "
    "movieId too; --column ROLE=NAME for other names)."
)


def _open(
    path: Path, fmt: str | None, job: Job, roles: tuple[str, ...]
) -> tuple[TableInput, dict[str, str]]:
    table = open_table(path, detect(path, fmt), headerless=HEADERLESS)
    names = {role: column_role(job, role, ROLES[role], table.schema.names) for role in roles}
    require_columns(table, names, HOW)
    movie_type = table.schema.field(names["movie_id"]).type
    if not (pa.types.is_integer(movie_type) or pa.types.is_null(movie_type)):  # null: empty
        raise ScoringError(
            f"input {path}: column {names['movie_id']!r} holds {movie_type}; "
            "movie ids are whole numbers"
        )
    return table, names


def _unknown_movie(runner: Any, movie_id: int, column: str) -> str:
    try:
        contract.positions(runner, [movie_id], column)
    except InputError as exc:
        return str(exc)
    raise AssertionError(f"movie {movie_id} is in the catalogue")


def _bad_rating(runner: Any, stars: float, column: str) -> str:
    """The API's words for a rating it refuses (checked against a movie it knows)."""
    known = int(runner.catalogue.movie_ids[0])
    try:
        contract.user_ratings(runner, [(known, stars)], max_ratings=1)
    except InputError as exc:
        return reason(exc, "ratings[0].rating", column)
    raise AssertionError(f"rating {stars} is valid")


def _valid_ratings(stars: np.ndarray) -> np.ndarray:
    """What user_ratings accepts, for a whole column at once: 1 to 5 in half stars."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(stars) & (stars >= 1) & (stars <= 5) & (stars * 2 == np.round(stars * 2))


Refused = list[tuple[Any, int, str]]  # (user id, row, reason)


def _checked(runner: Any, chunk: pa.Table, names: dict[str, str]) -> tuple[pa.Table, Refused]:
    """A chunk of ratings → the rows the HTTP API would take (user, movie, stars, row),
    and the others with the API's reason."""
    user, movie, rating = names["user_id"], names["movie_id"], names["rating"]
    users = chunk.column(user)
    movies = chunk.column(movie).to_numpy(zero_copy_only=False)
    stars = pc.cast(chunk.column(rating), pa.float64()).to_numpy(zero_copy_only=False)
    rows = chunk.column(ROW).to_numpy()
    no_user = users.is_null().to_numpy(zero_copy_only=False)
    no_movie = chunk.column(movie).is_null().to_numpy(zero_copy_only=False)
    no_rating = chunk.column(rating).is_null().to_numpy(zero_copy_only=False)
    filled = np.where(no_movie, -1, np.nan_to_num(movies, nan=-1)).astype(np.int64)
    unknown = ~no_movie & (runner.catalogue.positions(filled) < 0)
    bad_rating = ~no_movie & ~unknown & ~no_rating & ~_valid_ratings(stars)
    refuse = no_user | no_movie | no_rating | unknown | bad_rating
    refused = [
        (
            users[int(i)].as_py(),
            int(rows[i]),
            f"{user}: missing; every row needs an id"
            if no_user[i]
            else f"{movie}: missing"
            if no_movie[i]
            else _unknown_movie(runner, int(filled[i]), movie)
            if unknown[i]
            else f"{rating}: missing"
            if no_rating[i]
            else _bad_rating(runner, float(stars[i]), rating),
        )
        for i in np.flatnonzero(refuse)
    ]
    ok = ~refuse
    return pa.table(
        {
            "user": users.filter(pa.array(ok)),
            "movie": pa.array(filled[ok]),
            "stars": pa.array(stars[ok]),
            "row": pa.array(rows[ok]),
        }
    ), refused


def _first_ratings(ratings: pa.Table, movie: str) -> tuple[pa.Table, Refused]:
    """A movie rated twice by one user: the first rating counts, later ones are refused
    (the HTTP API refuses a request that rates a movie twice)."""
    ratings = ratings.sort_by([("user", "ascending"), ("movie", "ascending"), ("row", "ascending")])
    same = np.zeros(len(ratings), dtype=bool)
    if len(ratings) > 1:
        u, m = ratings.column("user"), ratings.column("movie")
        same[1:] = pc.equal(u.slice(1), u.slice(0, len(u) - 1)).to_numpy(
            zero_copy_only=False
        ) & pc.equal(m.slice(1), m.slice(0, len(m) - 1)).to_numpy(zero_copy_only=False)
    rows, movies = ratings.column("row").to_numpy(), ratings.column("movie").to_numpy()
    first = np.maximum.accumulate(np.where(~same, np.arange(len(same)), 0))
    refused = [
        (
            ratings.column("user")[int(i)].as_py(),
            int(rows[i]),
            f"{movie}: movie {movies[i]} is rated twice (also at row {rows[first[i]]}); "
            "send one rating per movie",
        )
        for i in np.flatnonzero(same)
    ]
    return ratings.filter(pa.array(~same)), refused


def group(
    runner: Any, table: TableInput, names: dict[str, str], id_type: pa.DataType, where: str = ""
) -> tuple[pa.Table, pa.Table]:
    """A ratings table → (one row per user: id, movie_ids, ratings, first_row; in user
    order) and the rows refused (id, row, reason), checked as the HTTP API checks them."""
    user = names["user_id"]
    kept: list[pa.Table] = []
    refused: Refused = []
    for chunk in table.chunks([user, names["movie_id"], names["rating"]], READ_ROWS):
        ok, bad = _checked(runner, chunk, names)
        kept.append(ok)
        refused += bad
    empty = pa.table(
        {
            "user": pa.array([], id_type),
            "movie": pa.array([], pa.int64()),
            "stars": pa.array([], pa.float64()),
            "row": pa.array([], pa.int64()),
        }
    )
    ratings, repeated = _first_ratings(
        pa.concat_tables([t.cast(empty.schema) for t in kept] or [empty]), names["movie_id"]
    )
    grouped = (
        ratings.sort_by([("user", "ascending"), ("row", "ascending")])
        .group_by("user", use_threads=False)
        .aggregate([("movie", "list"), ("stars", "list"), ("row", "min")])
    )
    grouped = pa.table(
        {
            user: grouped.column("user").cast(id_type),
            "movie_ids": grouped.column("movie_list"),
            "ratings": grouped.column("stars_list"),
            FIRST_ROW: grouped.column("row_min"),
        }
    )
    refused = sorted(refused + repeated, key=lambda r: r[1])
    rejects = pa.table(
        {
            user: pa.array([r[0] for r in refused], id_type),
            "row": pa.array([r[1] for r in refused], pa.int64()),
            "reason": pa.array([where + r[2] for r in refused], pa.string()),
        }
    )
    return grouped, rejects


def _user(runner: Any, settings: Settings, movie_ids: list[int], stars: list[float]) -> UserRatings:
    return contract.user_ratings(
        runner, list(zip(movie_ids, stars, strict=True)), max_ratings=settings.max_ratings
    )


def _runs(runner: Any, prepared: list[Prepared], batch: int) -> list[Any]:
    """The runner's rows for each one-user request, `batch` users per model run."""
    out: list[Any] = []
    for i in range(0, len(prepared), batch):
        out += runner.run_batch([p.part for p in prepared[i : i + batch]])
    return out


class TopKPlan(Plan):
    """A long ratings table → one row per user: `/recommender/recommend`'s answer."""

    fields = TOP_K_FIELDS
    unit = "users"

    def __init__(self, job: Job, settings: Settings) -> None:
        self.job, self.settings = job, settings
        self.table, self.names = _open(
            job.input, job.input_format, job, ("user_id", "movie_id", "rating")
        )
        self.id_column = job.id_column or self.names["user_id"]
        if self.id_column != self.names["user_id"]:
            raise ScoringError(
                f"--id-column {self.id_column}: top-k recommendations are per "
                f"user, so the id is the user column ({self.names['user_id']})"
            )
        self.id_type = self.table.schema.field(self.id_column).type
        self.grouped: Path | None = None

    def identity(self) -> dict[str, Any]:
        return {
            "input": fingerprint(self.table.path),
            "format": self.table.format,
            "columns": self.names,
            "k": self.job.k,
        }

    def check(self, runner: Any) -> None:
        request = contract.RecommendRequest(ratings=[], k=self.job.k)
        try:
            contract.prepare_recommend(runner, request, self.settings)
        except InputError as exc:
            raise ScoringError(f"--{exc}") from None

    def prepare(self, runner: Any, workdir: Path) -> None:
        self.grouped = workdir / GROUPED
        if not self.grouped.exists():
            users, rejects = group(runner, self.table, self.names, self.id_type)
            write_parquet_atomically(workdir / PRE_REJECTS, rejects)
            # Row groups of a few users: the blocks Ray Data hands its actors.
            write_parquet_atomically(self.grouped, users, row_group_rows=RAY_BLOCK_USERS)
        self.rows = pq.ParquetFile(self.grouped).metadata.num_rows

    def ray_source(self) -> tuple[TableInput, list[str], str | None]:
        assert self.grouped is not None, "prepare() first"
        columns = [self.id_column, "movie_ids", "ratings", FIRST_ROW]
        return open_table(self.grouped, "parquet"), columns, FIRST_ROW

    def chunks(self, chunk_rows: int) -> Iterator[pa.Table]:
        users, columns, _ = self.ray_source()
        for chunk in users.chunks(columns, chunk_rows):
            yield chunk.set_column(chunk.schema.get_field_index(ROW), ROW, chunk.column(FIRST_ROW))

    def score(self, runner: Any, chunk: pa.Table) -> Scored:
        good, rejects, prepared = [], [], []
        for i, (movies, stars) in enumerate(
            zip(
                chunk.column("movie_ids").to_pylist(),
                chunk.column("ratings").to_pylist(),
                strict=True,
            )
        ):
            try:
                user = _user(runner, self.settings, movies, stars)
            except InputError as exc:  # more ratings than DLSERVE_MAX_RATINGS
                rejects.append((i, reason(exc, "ratings", self.names["rating"])))
                continue
            good.append(i)
            prepared.append(Prepared([user], 1, contract.Query(user, k=self.job.k)))
        answers = [
            contract.respond_recommend(runner, p, rows)
            for p, rows in zip(prepared, _runs(runner, prepared, self.job.batch_size), strict=True)
        ]
        return Scored(
            np.asarray(good, np.int64),
            {
                "cold_start": pa.array([a.cold_start for a in answers], pa.bool_()),
                "ranking": pa.array([a.ranking for a in answers], pa.string()),
                "recommendations": pa.array(
                    [[r.model_dump() for r in a.recommendations] for a in answers],
                    pa.list_(RECOMMENDATION),
                ),
            },
            rejects,
        )


class PairsPlan(Plan):
    """`user_id, movie_id` pairs, with the users' ratings from --ratings → one row per pair:
    `/recommender/predict`'s answer for that movie."""

    fields = PAIR_FIELDS

    def __init__(self, job: Job, settings: Settings) -> None:
        assert job.ratings is not None
        self.job, self.settings = job, settings
        self.table, self.names = _open(job.input, job.input_format, job, ("user_id", "movie_id"))
        self.history, self.history_names = _open(
            job.ratings, job.ratings_format, job, ("user_id", "movie_id", "rating")
        )
        user, movie = self.names["user_id"], self.names["movie_id"]
        self.id_column = job.id_column or user
        require_columns(self.table, {"id": self.id_column}, "")
        self.id_type = self.table.schema.field(self.id_column).type
        self.passthrough = tuple(
            self.table.schema.field(c) for c in (user, movie) if c != self.id_column
        )
        self.rows = self.table.rows
        self.users: dict[Any, tuple[list[int], list[float]]] = {}

    def identity(self) -> dict[str, Any]:
        return {
            "input": fingerprint(self.table.path),
            "format": self.table.format,
            "columns": self.names,
            "id": self.id_column,
            "ratings": fingerprint(self.history.path),
        }

    def prepare(self, runner: Any, workdir: Path) -> None:
        user_type = self.history.schema.field(self.history_names["user_id"]).type
        users, refused = group(
            runner,
            self.history,
            self.history_names,
            user_type,
            where=f"--ratings {self.history.path}: ",
        )
        if not (workdir / PRE_REJECTS).exists():
            rejects = pa.table(
                {
                    self.id_column: pa.nulls(len(refused), self.id_type),
                    "row": refused.column("row"),
                    "reason": refused.column("reason"),
                }
            )
            write_parquet_atomically(workdir / PRE_REJECTS, rejects)
        self.users = {
            u: (m, r)
            for u, m, r in zip(
                users.column(0).to_pylist(),
                users.column("movie_ids").to_pylist(),
                users.column("ratings").to_pylist(),
                strict=True,
            )
        }

    def ray_source(self) -> tuple[TableInput, list[str], str | None]:
        columns = dict.fromkeys([self.id_column, self.names["user_id"], self.names["movie_id"]])
        return self.table, list(columns), None

    def chunks(self, chunk_rows: int) -> Iterator[pa.Table]:
        table, columns, _ = self.ray_source()
        return table.chunks(columns, chunk_rows)

    def score(self, runner: Any, chunk: pa.Table) -> Scored:
        user_col, movie_col = self.names["user_id"], self.names["movie_id"]
        users = chunk.column(user_col).to_pylist()
        movies = chunk.column(movie_col).to_pylist()
        rejects: list[tuple[int, str]] = []
        wanted: dict[Any, list[int]] = {}
        for i, (u, m) in enumerate(zip(users, movies, strict=True)):
            if u is None or m is None:
                rejects.append((i, f"{user_col if u is None else movie_col}: missing"))
            elif runner.catalogue.positions(np.asarray([m]))[0] < 0:
                rejects.append((i, _unknown_movie(runner, m, movie_col)))
            else:
                wanted.setdefault(u, []).append(i)
        prepared, rows_of = [], []
        for u, rows in wanted.items():
            try:
                user = _user(runner, self.settings, *self.users.get(u, ([], [])))
            except InputError as exc:
                rejects += [(i, reason(exc, "ratings", "--ratings")) for i in rows]
                continue
            query = contract.Query(
                user, movies=runner.catalogue.positions(np.asarray([movies[i] for i in rows]))
            )
            prepared.append(Prepared([user], 1, query))
            rows_of.append(rows)
        answer: dict[int, tuple[bool, float]] = {}
        for p, rows, result in zip(
            prepared, rows_of, _runs(runner, prepared, self.job.batch_size), strict=True
        ):
            response = contract.respond_predict(runner, p, result)
            for i, r in zip(rows, response.predicted_ratings, strict=True):
                answer[i] = (response.cold_start, r.predicted_rating)
        good = sorted(answer)
        return Scored(
            np.asarray(good, np.int64),
            {
                "cold_start": pa.array([answer[i][0] for i in good], pa.bool_()),
                "predicted_rating": pa.array([answer[i][1] for i in good], pa.float64()),
            },
            sorted(rejects),
        )


class RecommenderScorer:
    def plan(self, job: Job, settings: Settings) -> Plan:
        return PairsPlan(job, settings) if job.ratings else TopKPlan(job, settings)


SCORER = RecommenderScorer()
