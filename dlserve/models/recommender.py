"""The recommender runner: a user's ratings in, expected ratings for every movie out.

One request is one user. The batcher stacks concurrent users into one ONNX Runtime call
([users, movies, 5] one-hot, see `dlserve.preprocess.ratings`), and each route then reads
what it needs from its user's row: the k best movies the user has not rated
(`recommend`), or the rows of the movies asked about (`predict`). A user with no ratings
(cold start) is recommended the most-rated movies, and the response says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

from dlserve.data.movielens import load_movielens, rating_level
from dlserve.errors import InputError, PayloadTooLarge
from dlserve.models.base import Runner, split_rows
from dlserve.models.recsys_metrics import Biases, HeldOut, ranking_report, rmse, top_k
from dlserve.preprocess.ratings import Catalogue, UserRatings, by_user, one_hot
from dlserve.settings import Settings

RANK_K = 10  # evaluation cut-off: precision@10, recall@10, NDCG@10


@dataclass(frozen=True)
class Query:
    """One request: a user, and either how many recommendations or which movies to rate."""

    user: UserRatings
    k: int | None = None  # POST /recommender/recommend
    movies: np.ndarray | None = None  # POST /recommender/predict: catalogue positions


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


class RecommenderRunner(Runner):
    name = "recommender"

    @classmethod
    def load(cls, name: str, settings: Settings) -> Self:
        runner = super().load(name, settings)
        runner.catalogue = Catalogue.from_json(runner.stored.manifest.assets["catalogue"])
        # Cold start: most-rated first, ties by catalogue order.
        runner.by_popularity = np.argsort(-runner.catalogue.popularity, kind="stable")
        return runner

    # -- request parsing --------------------------------------------------------------

    def parse_query(self, ratings: list[tuple[Any, Any]], *, k: Any = None,
                    movie_ids: list[Any] | None = None, max_ratings: int) -> list[Query]:
        """A whole request → [Query] (one user: the batcher counts users)."""
        user = self.parse_ratings(ratings, max_ratings=max_ratings)
        if movie_ids is not None:
            return [Query(user, movies=self.parse_movie_ids(movie_ids, max_items=max_ratings))]
        return [Query(user, k=self.parse_k(k))]

    def parse_ratings(self, ratings: list[tuple[Any, Any]], *, max_ratings: int,
                      field: str = "ratings") -> UserRatings:
        """(movie_id, rating) pairs → a user; InputError names the first bad entry."""
        if len(ratings) > max_ratings:
            raise PayloadTooLarge(f"{field}: {len(ratings):,} ratings is more than the limit of "
                                  f"{max_ratings:,} per request")
        ids = self._positions([m for m, _ in ratings], f"{field}[{{i}}].movie_id")
        levels = np.empty(len(ratings), dtype=np.int8)
        for i, (_, stars) in enumerate(ratings):
            if not _is_number(stars) or not math.isfinite(stars) or not 1 <= stars <= 5:
                raise InputError(f"{field}[{i}].rating: expected a number from 1 to 5, "
                                 f"got {stars!r}")
            try:
                levels[i] = rating_level(stars)
            except ValueError:
                raise InputError(f"{field}[{i}].rating: expected whole or half stars "
                                 f"(1, 1.5, ..., 5), got {stars!r}") from None
        seen: dict[int, int] = {}
        for i, pos in enumerate(ids.tolist()):
            if pos in seen:
                raise InputError(f"{field}[{i}].movie_id: movie {ratings[i][0]} is rated twice "
                                 f"(also at {field}[{seen[pos]}]); send one rating per movie")
            seen[pos] = i
        return UserRatings(ids, levels)

    def parse_movie_ids(self, movie_ids: list[Any], *, max_items: int,
                        field: str = "movie_ids") -> np.ndarray:
        if not movie_ids:
            raise InputError(f"{field}: expected a non-empty list of movie ids")
        if len(movie_ids) > max_items:
            raise PayloadTooLarge(f"{field}: {len(movie_ids):,} movies is more than the limit "
                                  f"of {max_items:,} per request")
        return self._positions(movie_ids, f"{field}[{{i}}]")

    def parse_k(self, k: Any) -> int:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(self.catalogue):
            raise InputError(f"k: expected a whole number from 1 to {len(self.catalogue)} "
                             f"(the catalogue's size), got {k!r}")
        return k

    def _positions(self, movie_ids: list[Any], where: str) -> np.ndarray:
        for i, m in enumerate(movie_ids):
            if not isinstance(m, int) or isinstance(m, bool):
                raise InputError(f"{where.format(i=i)}: expected a whole number, got {m!r}")
        # Ids beyond int64 cannot be in the catalogue; -1 keeps them "unknown" below.
        ids = np.asarray([m if -2**63 <= m < 2**63 else -1 for m in movie_ids], dtype=np.int64)
        positions = self.catalogue.positions(ids)
        unknown = np.flatnonzero(positions < 0)
        if len(unknown):
            i = int(unknown[0])
            raise InputError(f"{where.format(i=i)}: movie {movie_ids[i]} is not in the "
                             f"catalogue ({len(unknown)} unknown id(s) in all); "
                             "see GET /models for the data the model was trained on")
        return positions

    # -- inference ----------------------------------------------------------------------

    def predict(self, users: list[UserRatings]) -> tuple[np.ndarray, np.ndarray]:
        """Expected ratings and relevance, each [len(users), movies]."""
        v = one_hot(users, len(self.catalogue))
        expected, relevance = self.session.run({self.session.input_names[0]: v})
        return expected, relevance

    def run_batch(self, parts: list[list[Query]]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Per request, per query: that user's (expected ratings, relevance) rows."""
        expected, relevance = self.predict([q.user for part in parts for q in part])
        counts = [len(p) for p in parts]
        return [list(zip(e, r, strict=True)) for e, r in
                zip(split_rows(expected, counts), split_rows(relevance, counts), strict=True)]

    def warm_up(self) -> None:
        empty = UserRatings(np.empty(0, np.int64), np.empty(0, np.int8))
        for n in (1, 8, 64):
            self.predict([empty] * n)

    # -- responses ------------------------------------------------------------------------

    def answer(self, query: Query, rows: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
        """The response body for one query, given its user's expected ratings and relevance."""
        expected, relevance = rows
        cold_start = not len(query.user)
        if query.movies is not None:
            return {"cold_start": cold_start,
                    "predicted_ratings": self.predicted_ratings(expected, query.movies)}
        assert query.k is not None
        return {"cold_start": cold_start,
                "ranking": "popularity (no ratings given)" if cold_start else "relevance",
                "recommendations": self.recommend(expected, relevance, query.user, query.k)}

    def recommend(self, expected: np.ndarray, relevance: np.ndarray, user: UserRatings,
                  k: int) -> list[dict[str, Any]]:
        """The k movies the user has not rated with the highest relevance (the chance they
        watch it and rate it 4 or 5); for a user with no ratings, the k most-rated movies."""
        top = self.by_popularity[:k] if not len(user) else top_k(relevance, user.movies, k)
        return [self._movie(int(i), expected, with_title=True) for i in top]

    def predicted_ratings(self, expected: np.ndarray, positions: np.ndarray) -> list[dict]:
        return [self._movie(int(i), expected, with_title=False) for i in positions]

    def _movie(self, i: int, expected: np.ndarray, *, with_title: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"movie_id": int(self.catalogue.movie_ids[i])}
        if with_title:
            out["title"] = self.catalogue.titles[i]
        out["predicted_rating"] = round(float(expected[i]), 4)
        return out

    # -- evaluation -------------------------------------------------------------------

    def evaluate(self, data_dir: Path, *, download_url: str | None = None) -> dict[str, Any]:
        """RMSE and top-10 ranking metrics on the held-out split, beside the baselines."""
        data = load_movielens(data_dir, url=download_url)
        try:
            train = by_user(data.train, self.catalogue)
            test = by_user(data.test, self.catalogue)
        except ValueError as exc:
            raise ValueError(f"{data_dir} does not match the model's catalogue ({exc}); "
                             "evaluate on the data set the model was trained on") from None
        users = [u for u in sorted(test) if u in train]
        held_out = [HeldOut(train[u], test[u]) for u in users]
        batches = [self.predict([train[u] for u in users[i: i + 256]])
                   for i in range(0, len(users), 256)]
        scores = np.concatenate([b[0] for b in batches])
        relevance = np.concatenate([b[1] for b in batches])
        actual = np.concatenate([test[u].levels for u in users]).astype(np.float64)
        model_pred = np.concatenate([s[test[u].movies] for s, u in zip(scores, users,
                                                                        strict=True)])
        bias = Biases.fit(train.values(), len(self.catalogue))
        bias_pred = np.concatenate([bias.predict(train[u], test[u].movies) for u in users])
        counts = np.bincount(np.concatenate([t.movies for t in train.values()]),
                             minlength=len(self.catalogue)).astype(np.float64)
        popularity = np.broadcast_to(counts, scores.shape)
        return {
            "model": self.tag,
            "provider": self.provider,
            "dataset": data.layout,
            "test_ratings": len(actual),
            "test_users": len(users),
            "rmse": round(rmse(model_pred, actual), 4),
            **ranking_report(relevance, held_out, RANK_K),
            # The same metrics for a list ranked by expected rating alone, for comparison.
            "ranked_by_expected_rating": ranking_report(scores, held_out, RANK_K),
            "baselines": {
                "global_mean": {"rmse": round(rmse(np.full_like(actual, bias.mean), actual), 4)},
                "user_item_bias": {"rmse": round(rmse(bias_pred, actual), 4)},
                "popularity": ranking_report(popularity, held_out, RANK_K),
            },
            "data_files": data.files,
        }
