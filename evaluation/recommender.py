"""recommender: RMSE and top-10 ranking metrics on the held-out split, beside the baselines."""

from __future__ import annotations

from typing import Any

import numpy as np

from dlserve.preprocess.ratings import by_user
from dlserve.registry import DataSource
from dlserve.runners.recommender import RecommenderRunner
from evaluation.recsys import (
    Biases,
    HeldOut,
    held_out_predictions,
    ranking_report,
    rating_counts,
    rmse,
)
from readers.movielens import load_movielens

RANK_K = 10  # precision@10, recall@10, NDCG@10
CHUNK = 256  # users per model run


def evaluate(runner: RecommenderRunner, source: DataSource) -> dict[str, Any]:
    data = load_movielens(source.folder, url=source.url)
    catalogue = runner.catalogue
    try:
        train = by_user(data.train, catalogue)
        test = by_user(data.test, catalogue)
    except ValueError as exc:
        raise ValueError(
            f"{source.folder} does not match the model's catalogue ({exc}); "
            "evaluate on the data set the model was trained on"
        ) from None
    users = [u for u in sorted(test) if u in train]
    held_out = [HeldOut(train[u], test[u]) for u in users]
    batches = [
        runner.predict([train[u] for u in users[i : i + CHUNK]])
        for i in range(0, len(users), CHUNK)
    ]
    scores = np.concatenate([b[0] for b in batches])
    relevance = np.concatenate([b[1] for b in batches])
    model_pred, actual = held_out_predictions(scores, [test[u] for u in users])
    bias = Biases.fit(train.values(), len(catalogue))
    bias_pred = np.concatenate([bias.predict(train[u], test[u].movies) for u in users])
    # Counted from the data evaluated on, not read from the catalogue: the two may differ.
    popularity = np.broadcast_to(
        rating_counts(train.values(), len(catalogue)).astype(float), scores.shape
    )
    return {
        "model": runner.tag,
        "provider": runner.provider,
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
