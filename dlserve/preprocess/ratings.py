"""Rating encoding for the recommender, shared by training, evaluation and serving.

A user is the set of movies they rated, each with a level 1..5 (`UserRatings`). The
model's visible layer is one softmax unit per movie in the catalogue; a batch of users
becomes a one-hot array [users, movies, 5] in which a rated movie has a single 1 at its
level and an unrated movie is all zeros, so it adds nothing to the hidden units' input
(unrated movies take no part). The catalogue maps the data set's movie ids, which have
gaps, onto those positions.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

LEVELS = 5  # rating levels 1..5, one softmax unit each


def rating_level(stars: float) -> int:
    """A rating of 0.5-5 stars (whole or half) → level 1..5, half stars rounded up: a 4.5
    is "better than 4", so it counts as a 5, as a whole-star scale would have forced the
    user to choose."""
    if not 0.5 <= stars <= 5 or (stars * 2) != int(stars * 2):
        raise ValueError(f"a rating must be 0.5 to 5 in steps of 0.5, got {stars!r}")
    return math.ceil(stars)


@dataclass(frozen=True)
class Ratings:
    """One rating per row, in a data set's own ids."""

    users: np.ndarray  # int64 [R]
    movies: np.ndarray  # int64 [R]
    levels: np.ndarray  # int8 [R], 1..5

    def __len__(self) -> int:
        return len(self.users)

    def take(self, rows: np.ndarray) -> Ratings:
        return Ratings(self.users[rows], self.movies[rows], self.levels[rows])


@dataclass(frozen=True)
class UserRatings:
    movies: np.ndarray  # int64 catalogue positions, no repeats
    levels: np.ndarray  # int8, 1..5

    def __len__(self) -> int:
        return len(self.movies)


class Catalogue:
    """The movies a model knows, in visible-unit order, with titles and training counts."""

    def __init__(self, movie_ids: np.ndarray, titles: list[str], popularity: np.ndarray) -> None:
        self.movie_ids = np.asarray(movie_ids, dtype=np.int64)
        self.titles = titles
        self.popularity = np.asarray(popularity, dtype=np.int64)  # ratings in training
        self._order = np.argsort(self.movie_ids)

    def __len__(self) -> int:
        return len(self.movie_ids)

    def positions(self, movie_ids: np.ndarray) -> np.ndarray:
        """Catalogue positions of the given movie ids; -1 where a movie is not in it."""
        ids = np.asarray(movie_ids, dtype=np.int64)
        sorted_ids = self.movie_ids[self._order]
        at = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
        return np.where(sorted_ids[at] == ids, self._order[at], -1)

    def find(self, query: str) -> np.ndarray:
        """Positions of the movies whose title holds every word of `query` (any case,
        accents ignored: "miserables" finds "Misérables"), most-rated first; every movie
        for an empty query."""
        words = fold(query).split()
        hits = [i for i, title in enumerate(self._folded_titles) if all(w in title for w in words)]
        found = np.asarray(hits, dtype=np.int64)
        return found[np.argsort(-self.popularity[found], kind="stable")]

    @cached_property
    def _folded_titles(self) -> list[str]:
        return [fold(t) for t in self.titles]

    def to_json(self) -> dict[str, Any]:
        return {
            "movie_ids": self.movie_ids.tolist(),
            "titles": self.titles,
            "popularity": self.popularity.tolist(),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Catalogue:
        return cls(np.asarray(raw["movie_ids"]), list(raw["titles"]), np.asarray(raw["popularity"]))


def fold(text: str) -> str:
    """Lower case without accents, for matching titles as people type them."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def by_user(ratings: Ratings, catalogue: Catalogue) -> dict[int, UserRatings]:
    """Each user's ratings, keyed by the data set's user id (every movie must be known)."""
    positions = catalogue.positions(ratings.movies)
    if (positions < 0).any():
        raise ValueError(f"movie id {ratings.movies[positions < 0][0]} is not in the catalogue")
    order = np.argsort(ratings.users, kind="stable")
    users, starts = np.unique(ratings.users[order], return_index=True)
    groups = np.split(order, starts[1:])
    return {
        int(u): UserRatings(positions[g], ratings.levels[g].astype(np.int8))
        for u, g in zip(users, groups, strict=True)
    }


def one_hot(users: list[UserRatings], n_movies: int) -> np.ndarray:
    """[len(users), n_movies, 5] float32: 1 at (user, movie, level − 1) for each rating."""
    v = np.zeros((len(users), n_movies, LEVELS), dtype=np.float32)
    if users:
        rows = np.repeat(np.arange(len(users)), [len(u) for u in users])
        movies = np.concatenate([u.movies for u in users])
        levels = np.concatenate([u.levels for u in users]).astype(np.int64) - 1
        v[rows, movies, levels] = 1.0
    return v
