"""The recommender runner: users' ratings in; expected ratings and relevance for every movie out.

The batcher stacks concurrent users into one ONNX Runtime call ([users, movies, 5]
one-hot, see `dlserve.preprocess.ratings`); each request then reads what it needs from
its users' rows (dlserve/models/recommender.py). `top_k` ranks a row the one way the
service and evaluation both use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dlserve.preprocess.ratings import Catalogue, UserRatings, one_hot
from dlserve.runners.base import Runner, Seen, split_rows
from dlserve.runtime import Session
from dlserve.store import StoredModel

Rows = tuple[np.ndarray, np.ndarray]  # expected ratings and relevance, each [users, movies]
# A movie's popularity band, by its ratings in the training data: the most-rated movies
# that together hold the first third of the ratings are the head, the next third the torso,
# the rest the tail (u1.base of MovieLens 100K: 116, 239 and 1,327 of its 1,682 movies).
POPULARITY_BANDS = ["head", "torso", "tail"]


def popularity_bands(popularity: np.ndarray) -> np.ndarray:
    """Each movie's band (an index into POPULARITY_BANDS) from its training ratings."""
    order = np.argsort(-popularity, kind="stable")
    counts = popularity[order]
    before = (np.cumsum(counts) - counts) / max(int(counts.sum()), 1)  # share of the more-rated
    bands = np.empty(len(popularity), dtype=np.int64)
    bands[order] = np.searchsorted([1 / 3, 2 / 3], before, side="right")
    return bands


def distinct_positions(positions: np.ndarray, size: int) -> int:
    """How many different positions (0 ≤ p < size) `positions` holds: 3 µs for a user's
    85 movies, where len(np.unique(...)) took 20."""
    seen = np.zeros(size, dtype=bool)
    seen[positions] = True
    return int(np.count_nonzero(seen))


def top_k(scores: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores, best first, skipping `exclude`; ties → lower
    position first, so the order is deterministic."""
    s = np.asarray(scores, dtype=np.float64).copy()
    s[exclude] = -np.inf
    k = min(k, len(s) - distinct_positions(exclude, len(s)))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    candidates = np.argpartition(-s, k - 1)[:k] if k < len(s) else np.arange(len(s))
    # Re-rank the candidates (and anything tied with the k-th) by score, then position.
    cutoff = s[candidates].min()
    pool = np.flatnonzero(s >= cutoff)
    return pool[np.lexsort((pool, -s[pool]))][:k]


class RecommenderRunner(Runner[list[UserRatings], Rows]):
    def __init__(self, stored: StoredModel, session: Session) -> None:
        super().__init__(stored, session)
        self.catalogue = Catalogue.from_json(stored.manifest.assets["catalogue"])
        # Cold start: most-rated first, ties by catalogue order.
        self.by_popularity = np.argsort(-self.catalogue.popularity, kind="stable")
        self.bands = popularity_bands(self.catalogue.popularity)

    @property
    def classes(self) -> list[str]:
        """What the prediction-mix metrics count: recommended movies, by popularity band."""
        return POPULARITY_BANDS

    def predict(self, users: list[UserRatings]) -> Rows:
        """Expected ratings and relevance, each [len(users), movies]."""
        v = one_hot(users, len(self.catalogue))
        expected, relevance = self.session.run({self.session.input_names[0]: v})
        return expected, relevance

    def run_batch(self, parts: list[list[UserRatings]]) -> list[Rows]:
        users = [u for part in parts for u in part]
        expected, relevance = self.predict(users)
        if self.observe is not None:  # the input statistic: each user's ratings
            self.observe(Seen(inputs=np.fromiter(map(len, users), np.int64, len(users))))
        counts = [len(p) for p in parts]
        return list(zip(split_rows(expected, counts), split_rows(relevance, counts), strict=True))

    def join(self, results: list[Rows]) -> Rows:
        return (np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results]))

    def warm_up(self) -> list[Any]:
        empty = UserRatings(np.empty(0, np.int64), np.empty(0, np.int8))
        return [self.predict([empty] * n) for n in (1, 8, 64)]

    def recommend(self, relevance: np.ndarray, user: UserRatings, k: int) -> np.ndarray:
        """Positions of the k movies the user has not rated with the highest relevance (the
        chance they watch it and rate it 4 or 5); for a user with no ratings, the k
        most-rated movies. Counted by popularity band where the service watches the mix."""
        top = self.by_popularity[:k] if not len(user) else top_k(relevance, user.movies, k)
        if self.observe is not None:
            self.observe(Seen(classes=self.bands[top]))
        return top
