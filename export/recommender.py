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

from dlserve.manifest import TensorSpec
from dlserve.preprocess.ratings import LEVELS
from dlserve.store import StoredModel
from export.onnx_export import ExportSpec, export_and_publish
from training.common import load_trained
from training.recommender import RecommenderRun, build_model, example_inputs

PARITY_USERS = (1, 7, 64)


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
        training_data=asdict(run.data),
        example=example_inputs(2, n_movies),
        parity_cases=[example_inputs(n, n_movies, seed=n) for n in PARITY_USERS],
    )
    return export_and_publish(model, spec, precision=precision)
