"""Recommender metrics and the two baselines they are reported beside (torch-free).

- RMSE of predicted ratings on the held-out ratings; baselines: the global mean, and
  user + item biases (r̂ = μ + b_u + b_i, each bias shrunk towards 0 by a damping term,
  as in Koren's "Factor in the neighbors", 2008).
- precision@k, recall@k and NDCG@k of a ranking of the whole catalogue, less the movies a
  user rated in training, against the held-out movies the user rated 4 or 5 ("relevant");
  averaged over the users who have at least one. Baseline: popularity, the movies with
  the most training ratings first, the same list for everyone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dlserve.preprocess.ratings import UserRatings

RELEVANT_LEVEL = 4
ITEM_DAMPING, USER_DAMPING = 25.0, 10.0


def rmse(predicted: np.ndarray, actual: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(predicted, float) - actual) ** 2)))


def top_k(scores: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores, best first, skipping `exclude`; ties → lower
    position first, so the order is deterministic."""
    s = np.asarray(scores, dtype=np.float64).copy()
    s[exclude] = -np.inf
    k = min(k, len(s) - len(np.unique(exclude)))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    candidates = np.argpartition(-s, k - 1)[:k] if k < len(s) else np.arange(len(s))
    # Re-rank the candidates (and anything tied with the k-th) by score, then position.
    cutoff = s[candidates].min()
    pool = np.flatnonzero(s >= cutoff)
    return pool[np.lexsort((pool, -s[pool]))][:k]


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
    return {f"precision@{k}": round(float(np.mean(precision)), 4),
            f"recall@{k}": round(float(np.mean(recall)), 4),
            f"ndcg@{k}": round(float(np.mean(ndcg)), 4),
            "ranked_users": len(precision)}


def bias_baseline(train: dict[int, UserRatings], n_movies: int):
    """Fit μ, b_i, b_u on the training ratings; return predict(user_id, positions)."""
    movies = np.concatenate([u.movies for u in train.values()])
    levels = np.concatenate([u.levels for u in train.values()]).astype(np.float64)
    mu = levels.mean()
    item_sum = np.bincount(movies, weights=levels - mu, minlength=n_movies)
    item_n = np.bincount(movies, minlength=n_movies)
    b_item = item_sum / (ITEM_DAMPING + item_n)
    b_user = {uid: float((u.levels - mu - b_item[u.movies]).sum() / (USER_DAMPING + len(u)))
              for uid, u in train.items()}

    def predict(user_id: int, positions: np.ndarray) -> np.ndarray:
        return np.clip(mu + b_user.get(user_id, 0.0) + b_item[positions], 1, 5)

    return predict
