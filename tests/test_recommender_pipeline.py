"""The recommender through the real CLI: train → export → eval on MovieLens 100K, and the
same commands on a ratings.csv/movies.csv folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dlserve import store
from dlserve.errors import InputError
from dlserve.models.recommender import user_ratings
from dlserve.preprocess.ratings import Catalogue, UserRatings, by_user, one_hot, rating_level
from dlserve.registry import load_runner
from dlserve.settings import get_settings
from evaluation.recsys import Biases
from readers.movielens import load_movielens
from tests.conftest import dlserve
from tests.movielens_files import write_csv_release
from training.common import load_run, load_trained, run_paths
from training.recommender import RecommenderRun, build_model


@pytest.fixture(scope="module")
def runner(recommender_model: str):
    return load_runner("recommender", get_settings())


def test_training_writes_checkpoint_catalogue_metrics_and_curve(recommender_model) -> None:
    paths = run_paths(Path(os.environ["DLSERVE_ARTIFACTS_DIR"]), "recommender")
    state, run, metrics = load_run(paths, RecommenderRun)  # weights_only=True inside
    hidden = run.model_config.hidden
    assert state["weight"].shape == (1682, 5, hidden) and state["visible_bias"].shape == (1682, 5)
    assert run.catalogue["titles"][49] == "Star Wars (1977)"
    assert sum(run.catalogue["popularity"]) == 80_000
    assert len(metrics["history"]["held-out RMSE"]) == metrics["epochs_run"]
    assert metrics["held_out_rmse_torch"] < 1.0
    assert paths.curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rbm_conditions_on_the_bias_models_user_offset(recommender_model, data_dir) -> None:
    """The model's b_u is the bias baseline's, worked out inside the exported graph from
    the ratings alone; a higher b_u moves the prediction towards the high levels."""
    model, run, _ = load_trained(
        Path(os.environ["DLSERVE_ARTIFACTS_DIR"]), "recommender", RecommenderRun, build_model
    )
    catalogue = Catalogue.from_json(run.catalogue)
    train = by_user(load_movielens(data_dir / "ml-100k").train, catalogue)
    biases = Biases.fit(train.values(), len(catalogue))
    assert float(model.mean_rating) == pytest.approx(biases.mean, abs=1e-6)
    assert np.allclose(model.item_bias.numpy(), biases.item, atol=1e-6)
    users = [
        train[1],
        train[13],
        UserRatings(np.array([49]), np.array([1], np.int8)),
        UserRatings(np.empty(0, np.int64), np.empty(0, np.int8)),
    ]
    offsets = model.user_offset(torch.from_numpy(one_hot(users, len(catalogue))))
    assert np.allclose(offsets.detach().numpy(), [biases.user(u) for u in users], atol=1e-5)
    assert offsets[-1] == 0 and offsets[2] < 0  # no ratings; one harsh rating
    assert np.all(np.diff(model.offset_weight.detach().numpy()) > 0)


def test_export_refuses_a_checkpoint_of_an_older_model_by_name(
    recommender_model, tmp_path: Path
) -> None:
    """A checkpoint from before the offset weights existed: a clear error, no model stored."""
    src = run_paths(Path(os.environ["DLSERVE_ARTIFACTS_DIR"]), "recommender")
    old = run_paths(tmp_path, "recommender")
    shutil.copytree(src.root, old.root)
    state = torch.load(old.checkpoint, weights_only=True)
    del state["offset_weight"], state["item_bias"]
    torch.save(state, old.checkpoint)
    before = store.load("recommender").tag
    result = dlserve(
        "export", "recommender", check=False, env={"DLSERVE_ARTIFACTS_DIR": str(tmp_path)}
    )
    assert result.returncode == 2
    assert "missing: item_bias, offset_weight" in result.stderr
    assert "dlserve train recommender" in result.stderr and "Traceback" not in result.stderr
    assert store.load("recommender").tag == before == recommender_model


def test_export_manifest_carries_the_movie_table(recommender_model) -> None:
    m = store.load("recommender").manifest
    assert m.inputs[0].shape == ["users", 1682, 5]
    assert [o.name for o in m.outputs] == ["expected_ratings", "relevance"]
    assert m.metrics["parity_max_abs_diff"] <= 1e-4
    assert len(m.assets["catalogue"]["movie_ids"]) == 1682
    assert set(m.training_data["files"]) == {"u.item", "u1.base", "u1.test"}


def test_onnx_outputs_ratings_and_relevance_independent_of_the_batch(runner) -> None:
    user = user_ratings(runner, [(50, 5), (172, 4.5), (181, 1)], max_ratings=10)
    other = user_ratings(runner, [(1, 2), (2, 3)], max_ratings=10)
    expected, relevance = runner.predict([user, other, user])
    assert expected.shape == relevance.shape == (3, 1682)
    assert np.all((expected >= 1) & (expected <= 5)) and np.all((relevance >= 0) & (relevance <= 1))
    alone = runner.predict([user])
    assert np.allclose(expected[2], alone[0][0], atol=1e-5)
    assert np.allclose(expected[0], expected[2])
    # Relevance is the chance of a 4 or 5 times the share of users who rated the movie.
    share = runner.catalogue.popularity / 943
    assert np.all(relevance[0] <= share + 1e-6)


def test_eval_json_reports_rmse_and_ranking_beside_baselines(recommender_model) -> None:
    metrics = json.loads(dlserve("eval", "recommender", "--json").stdout)
    assert metrics["model"] == recommender_model and metrics["test_ratings"] == 20_000
    base = metrics["baselines"]
    # Even the --quick model (8 epochs) beats the bias baseline (0.964 against 0.971).
    assert 0.8 < metrics["rmse"] < base["user_item_bias"]["rmse"]
    assert base["global_mean"]["rmse"] == pytest.approx(1.154, abs=1e-3)
    assert base["user_item_bias"]["rmse"] == pytest.approx(0.97, abs=0.01)
    for key in ("precision@10", "recall@10", "ndcg@10"):
        assert 0 <= metrics[key] <= 1 and 0 < base["popularity"][key] <= 1
        assert 0 <= metrics["ranked_by_expected_rating"][key] <= 1


def test_same_commands_train_and_evaluate_a_ratings_csv_folder(tmp_path: Path) -> None:
    """A newer-release folder: each user loves one genre; the model should learn that."""
    genre_of = write_csv_release(tmp_path / "data" / "ml-small")
    env = {
        "DLSERVE_DATA_DIR": str(tmp_path / "data"),
        "DLSERVE_MOVIELENS": "ml-small",
        "DLSERVE_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "BENTOML_HOME": str(tmp_path / "bentoml"),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        dlserve("train", "recommender", "--epochs", "200")
        dlserve("export", "recommender")
        metrics = json.loads(dlserve("eval", "recommender", "--json").stdout)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert "ratings.csv" in metrics["dataset"] and metrics["test_users"] == 120
    # Ratings follow the genre a user loves: far better than the user+item bias baseline.
    assert metrics["rmse"] < 0.8 * metrics["baselines"]["user_item_bias"]["rmse"]
    assert metrics["ndcg@10"] > metrics["baselines"]["popularity"]["ndcg@10"] + 0.2
    assert len(genre_of) == 60


@pytest.mark.parametrize(
    ("ratings", "error"),
    [
        ([(1, 5.0), (2, 0.5)], r"ratings\[1\]\.rating: expected a number from 1 to 5, got 0\.5"),
        ([(1, 5.0), (2, float("nan"))], r"ratings\[1\]\.rating: expected a number from 1 to 5"),
        ([(1, 5.0), (2, 1e308)], r"ratings\[1\]\.rating: expected a number from 1 to 5"),
        ([(1, 4.25)], r"ratings\[0\]\.rating: expected whole or half stars"),
        (
            [(1, 4.0), (2, 3.0), (1, 2.0)],
            r"ratings\[2\]\.movie_id: movie 1 is rated twice "
            r"\(also at ratings\[0\]\)",
        ),
    ],
)
def test_user_ratings_names_the_first_bad_entry(runner, ratings, error: str) -> None:
    with pytest.raises(InputError, match=error):
        user_ratings(runner, ratings, max_ratings=100)


def test_user_ratings_levels_are_each_ratings_level(runner) -> None:
    rng = np.random.default_rng(0)
    ids = rng.choice(runner.catalogue.movie_ids, 85, replace=False).tolist()
    stars = (rng.integers(2, 11, 85) / 2).tolist()  # 1 to 5 in half stars
    user = user_ratings(runner, list(zip(ids, stars, strict=True)), max_ratings=100)
    assert user.levels.tolist() == [rating_level(s) for s in stars]
    assert user.movies.tolist() == runner.catalogue.positions(np.array(ids)).tolist()
    assert len(user_ratings(runner, [], max_ratings=100)) == 0
