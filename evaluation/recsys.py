"""Recommender metrics and the baselines they are reported beside (torch-free; training
reports the same RMSE and conditions the RBM on the bias baseline's user term).

- RMSE of predicted ratings on the held-out ratings; baselines: the global mean, and
  user + item biases (r̂ = μ + b_u + b_i, each bias shrunk towards 0 by a damping term,
  as in Koren's "Factor in the neighbors", 2008).
- precision@k, recall@k and NDCG@k of a ranking of the whole catalogue, less the movies a
  user rated in training, against the held-out movies the user rated 4 or 5 ("relevant");
  averaged over the users who have at least one. Baseline: popularity, the movies with
  the most training ratings first, the same list for everyone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from dlserve.preprocess.ratings import UserRatings
from dlserve.runners.recommender import top_k

RELEVANT_LEVEL = 4
ITEM_DAMPING, USER_DAMPING = 25.0, 10.0


def rmse(predicted: np.ndarray, actual: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(predicted, float) - actual) ** 2)))


def rating_counts(users: Iterable[UserRatings], n_movies: int) -> np.ndarray:
    """How many of these users rated each movie: the popularity ranking and its baseline."""
    rated = [u.movies for u in users]
    return np.bincount(
        np.concatenate(rated) if rated else np.empty(0, np.int64), minlength=n_movies
    )


def held_out_predictions(
    scores: np.ndarray, test: list[UserRatings]
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's score row read at the movies they rated in the held-out split, next to
    those ratings: (predicted, actual), flat, in the users' order."""
    predicted = np.concatenate([row[t.movies] for row, t in zip(scores, test, strict=True)])
    actual = np.concatenate([t.levels for t in test]).astype(np.float64)
    return predicted, actual


@dataclass(frozen=True)
class HeldOut:
    """What one user rated in training (to exclude) and in the test split (to score)."""

    train: UserRatings
    test: UserRatings


def ranking_report(score_rows: np.ndarray, users: list[HeldOut], k: int = 10) -> dict[str, float]:
    """Mean precision@k, recall@k, NDCG@k (binary relevance) over users with a relevant
    held-out movie. `score_rows[i]` scores the whole catalogue for `users[i]`."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    precision, recall, ndcg = [], [], []
    for scores, user in zip(score_rows, users, strict=True):
        relevant = user.test.movies[user.test.levels >= RELEVANT_LEVEL]
        if not len(relevant):
            continue
        hits = np.isin(top_k(scores, user.train.movies, k), relevant)
        precision.append(hits.sum() / k)
        recall.append(hits.sum() / len(relevant))
        ideal = discounts[: min(len(relevant), k)].sum()
        ndcg.append(float((discounts[: len(hits)] * hits).sum() / ideal))
    return {
        f"precision@{k}": round(float(np.mean(precision)), 4),
        f"recall@{k}": round(float(np.mean(recall)), 4),
        f"ndcg@{k}": round(float(np.mean(ndcg)), 4),
        "ranked_users": len(precision),
    }


@dataclass(frozen=True)
class Biases:
    """The user + item bias model: μ and each movie's b_i, fitted on training ratings;
    b_u is worked out from whatever ratings a user brings, so it serves new users too.
    The RBM conditions on the same b_u (`training.recommender.RBM.user_offset`)."""

    mean: float
    item: np.ndarray  # [movies]

    @classmethod
    def fit(cls, train: Iterable[UserRatings], n_movies: int) -> Biases:
        users = list(train)
        movies = np.concatenate([u.movies for u in users])
        levels = np.concatenate([u.levels for u in users]).astype(np.float64)
        mu = float(levels.mean())
        item_sum = np.bincount(movies, weights=levels - mu, minlength=n_movies)
        return cls(mu, item_sum / (ITEM_DAMPING + np.bincount(movies, minlength=n_movies)))

    def user(self, ratings: UserRatings) -> float:
        """b_u: the user's mean deviation from μ + b_i, shrunk towards 0 (0 with no ratings)."""
        deviation = ratings.levels - self.mean - self.item[ratings.movies]
        return float(deviation.sum() / (USER_DAMPING + len(ratings)))

    def predict(self, ratings: UserRatings, positions: np.ndarray) -> np.ndarray:
        """r̂ = μ + b_u + b_i for the movies at `positions`, clipped to 1..5."""
        return np.clip(self.mean + self.user(ratings) + self.item[positions], 1, 5)
