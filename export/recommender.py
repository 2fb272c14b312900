"""Export the trained RBM's inference pass: one-hot ratings in; expected ratings, and the
relevance score that ranks recommendations, out.

The input is [users, movies, 5] with a dynamic user axis; a movie the user did not rate
is all zeros. Parity with PyTorch is checked for 1, 7 and 64 users, one of whom rated
nothing (the cold-start case). The movie table (ids, titles, training counts for the
popularity fallback) travels in the manifest.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dlserve.manifest import Distribution, TensorSpec
from dlserve.preprocess.ratings import LEVELS, Catalogue, by_user, one_hot
from dlserve.runners.recommender import POPULARITY_BANDS, popularity_bands, top_k
from dlserve.store import StoredModel
from export.onnx_export import ExportSpec, export_and_publish, with_distribution
from readers.movielens import load_movielens
from training.common import load_trained
from training.recommender import RBM, RecommenderRun, build_model, example_inputs

PARITY_USERS = (1, 7, 64)
# Recommendations per user in the reference mix: the recommend route's default k.
REFERENCE_K = 10


def export(artifacts_dir: Path, *, precision: str = "fp32") -> StoredModel:
    model, run, metrics = load_trained(artifacts_dir, "recommender", RecommenderRun, build_model)
    n_movies = run.model_config.n_movies
    spec = ExportSpec(
        name="recommender",
        task="rating-prediction",
        architecture=run.architecture,
        inputs=[TensorSpec("ratings", "float32", ["users", n_movies, LEVELS])],
        outputs=[
            TensorSpec("expected_ratings", "float32", ["users", n_movies]),
            TensorSpec("relevance", "float32", ["users", n_movies]),
        ],
        preprocessing={
            "kind": "one-hot ratings",
            "module": "dlserve.preprocess.ratings",
            "levels": list(range(1, LEVELS + 1)),
            "unrated": "all-zero row (takes no part)",
            "half_stars": "rounded up (4.5 → 5)",
        },
        labels=[],
        assets={"catalogue": run.catalogue},
        metrics=metrics,
        training_data=with_distribution(
            "recommender", asdict(run.data), lambda: distribution(model, run)
        ),
        example=example_inputs(2, n_movies),
        parity_cases=[example_inputs(n, n_movies, seed=n) for n in PARITY_USERS],
    )
    return export_and_publish(model, spec, precision=precision)


def distribution(model: RBM, run: RecommenderRun) -> dict[str, Distribution]:
    """What the service compares its traffic with (service/drift.py): the popularity bands
    of the movies recommended to the training users (REFERENCE_K each, from their training
    ratings, as the recommend route ranks them), and their number of ratings; also, for
    the record, the bands' share of the training ratings (a third each, by construction)."""
    catalogue = Catalogue.from_json(run.catalogue)
    users = list(by_user(load_movielens(Path(run.data.dir)).train, catalogue).values())
    bands = popularity_bands(catalogue.popularity)
    recommended = []
    with torch.no_grad():
        for i in range(0, len(users), 256):
            batch = users[i : i + 256]
            _, relevance = model.eval()(torch.from_numpy(one_hot(batch, len(catalogue))))
            recommended += [
                bands[top_k(row, user.movies, REFERENCE_K)]
                for row, user in zip(relevance.numpy(), batch, strict=True)
            ]
    rated = bands[np.concatenate([u.movies for u in users])]
    return {
        "class": Distribution.of_classes(
            f"movies recommended to the training users, {REFERENCE_K} each",
            POPULARITY_BANDS,
            np.concatenate(recommended),
        ),
        "input": Distribution.of_quantiles(
            "ratings per training user", np.array([len(u) for u in users])
        ),
        "ratings": Distribution.of_classes("training ratings", POPULARITY_BANDS, rated),
    }
