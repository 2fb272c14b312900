"""/recommender/recommend and /recommender/predict over real HTTP against a real server."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from readers.movielens import load_movielens
from tests.conftest import dlserve

# A user who has seen only a few space operas, all loved.
SPACE_FAN = [
    {"movie_id": 50, "rating": 5},
    {"movie_id": 172, "rating": 5},
    {"movie_id": 181, "rating": 4.5},
    {"movie_id": 271, "rating": 4},
]


def recommend(client: httpx.Client, body: object) -> httpx.Response:
    return client.post("/recommender/recommend", json=body)


def test_a_few_films_of_one_kind_get_new_titled_recommendations(client, recommender_model) -> None:
    r = recommend(client, {"ratings": SPACE_FAN, "k": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == recommender_model and body["cold_start"] is False
    recs = body["recommendations"]
    assert len(recs) == 10
    assert not {m["movie_id"] for m in recs} & {m["movie_id"] for m in SPACE_FAN}
    assert all(m["title"] and 1 <= m["predicted_rating"] <= 5 for m in recs)
    assert len({m["movie_id"] for m in recs}) == 10


def test_cold_start_answers_with_the_popularity_ranking_and_says_so(client) -> None:
    body = recommend(client, {"ratings": [], "k": 3}).json()
    assert body["cold_start"] is True and body["ranking"].startswith("popularity")
    assert [m["title"] for m in body["recommendations"]][0] == "Star Wars (1977)"


def test_predict_agrees_with_eval_on_the_held_out_ratings(
    client, data_dir: Path, recommender_model
) -> None:
    """Every u1.test user's u1.base ratings in, their u1.test movies asked about: the RMSE
    of the HTTP answers is `dlserve eval`'s RMSE."""
    ml = load_movielens(data_dir / "ml-100k")
    users = np.unique(ml.test.users)

    def ask(user: int) -> tuple[list[float], list[int]]:
        base, test = ml.train.users == user, ml.test.users == user
        ratings = [
            {"movie_id": int(m), "rating": int(r)}
            for m, r in zip(ml.train.movies[base], ml.train.levels[base], strict=True)
        ]
        movie_ids = ml.test.movies[test].tolist()
        r = client.post("/recommender/predict", json={"ratings": ratings, "movie_ids": movie_ids})
        assert r.status_code == 200, r.text
        answers = r.json()["predicted_ratings"]
        assert [a["movie_id"] for a in answers] == movie_ids
        return [a["predicted_rating"] for a in answers], ml.test.levels[test].tolist()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, users))
    predicted = np.concatenate([p for p, _ in results])
    actual = np.concatenate([a for _, a in results])
    metrics = json.loads(dlserve("eval", "recommender", "--json").stdout)
    assert len(actual) == metrics["test_ratings"]
    assert np.sqrt(np.mean((predicted - actual) ** 2)) == pytest.approx(metrics["rmse"], abs=2e-4)


BAD = [
    (
        {"ratings": [{"movie_id": 99999, "rating": 4}]},
        400,
        r"ratings\[0\].movie_id: movie 99999 "
        "is not in the catalogue",
    ),
    (
        {"ratings": [{"movie_id": 1, "rating": 6}]},
        400,
        r"ratings\[0\].rating: expected a number "
        "from 1 to 5, got 6",
    ),
    ({"ratings": [{"movie_id": 1, "rating": 0}]}, 400, r"ratings\[0\].rating: .*from 1 to 5"),
    ({"ratings": [{"movie_id": 1, "rating": 3.3}]}, 400, r"ratings\[0\].rating: .*half stars"),
    (
        {"ratings": [{"movie_id": 1, "rating": "five"}]},
        400,
        r"ratings\[0\].rating: Input should "
        "be a valid number",
    ),
    ({"ratings": [{"movie_id": 1, "rating": None}]}, 400, r"ratings\[0\].rating"),
    ({"ratings": [{"movie_id": "1", "rating": 4}]}, 400, r"ratings\[0\].movie_id"),
    (
        {"ratings": [{"movie_id": 1, "rating": 4}, {"movie_id": 1, "rating": 2}]},
        400,
        r"ratings\[1\].movie_id: movie 1 is rated twice \(also at ratings\[0\]\)",
    ),
    ({"ratings": SPACE_FAN, "k": 0}, 400, "k: expected a whole number from 1 to 1682"),
    ({"ratings": SPACE_FAN, "k": -3}, 400, "k: expected a whole number from 1 to 1682"),
    ({"ratings": SPACE_FAN, "k": 1683}, 400, "k: .*the catalogue's size"),
    ({"ratings": SPACE_FAN, "k": 2.5}, 400, "k: Input should be a valid integer"),
    ({"ratings": [{"movie_id": 1}]}, 400, r"ratings\[0\].rating: Field required"),
    ({"k": 3}, 400, "ratings: Field required"),
    ({"ratings": {"movie_id": 1, "rating": 4}}, 400, "ratings: Input should be a valid array"),
]


@pytest.mark.parametrize("body, status, message", BAD)
def test_bad_recommend_requests_get_a_4xx_naming_the_problem(client, body, status, message) -> None:
    r = recommend(client, body)
    assert r.status_code == status, r.text
    assert re.search(message, r.json()["error"]), r.text
    assert recommend(client, {"ratings": SPACE_FAN, "k": 2}).status_code == 200


def test_100000_ratings_in_one_request_is_413(client) -> None:
    ratings = [{"movie_id": i % 1682 + 1, "rating": 3} for i in range(100_000)]
    r = recommend(client, {"ratings": ratings, "k": 5})
    assert r.status_code == 413 and "100,000 ratings is more than the limit of 10,000" in r.text


def test_predict_rejects_unknown_and_empty_movie_lists(client) -> None:
    r = client.post("/recommender/predict", json={"ratings": SPACE_FAN, "movie_ids": [1, 7777]})
    assert r.status_code == 400 and "movie_ids[1]: movie 7777 is not in the catalogue" in r.text
    r = client.post("/recommender/predict", json={"ratings": SPACE_FAN, "movie_ids": []})
    assert r.status_code == 400 and "movie_ids: expected a non-empty list" in r.text
    r = client.post("/recommender/predict", json={"ratings": [], "movie_ids": [1, 1]})
    assert r.status_code == 200 and r.json()["cold_start"] is True
    first, second = r.json()["predicted_ratings"]
    assert first == second and first["movie_id"] == 1


def test_concurrent_users_get_their_own_answers(client) -> None:
    """Requests batched together on the server answer exactly as they do alone."""
    bodies = [
        {"ratings": [{"movie_id": m, "rating": 1 + m % 5}], "movie_ids": [1, 50, 100]}
        for m in range(1, 65)
    ]
    alone = [
        client.post("/recommender/predict", json=b).json()["predicted_ratings"] for b in bodies[:8]
    ]
    with ThreadPoolExecutor(32) as pool:
        together = list(
            pool.map(
                lambda b: client.post("/recommender/predict", json=b).json()["predicted_ratings"],
                bodies,
            )
        )
    assert together[:8] == alone
