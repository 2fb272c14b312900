"""recommender: movie recommendations, a conditional RBM trained on MovieLens.

One request is one user: their ratings, and either how many recommendations (`recommend`)
or which movies to rate (`predict`). The runner gives the user's expected rating and
relevance for every movie; `recommend` answers with the k best movies the user has not
rated, `predict` with the rows asked about. A user with no ratings (cold start) is
recommended the most-rated movies, and the response says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from dlserve.errors import InputError, PayloadTooLarge
from dlserve.prepared import Prepared
from dlserve.preprocess.ratings import UserRatings, rating_level
from dlserve.protocol import TensorDecl, Tensors, parameter
from dlserve.registry import DataSource, Lookup, ModelSpec, PrecisionPlan, Ref, Route
from dlserve.runners.recommender import RecommenderRunner, Rows, distinct_positions
from dlserve.settings import Settings


class RatingIn(BaseModel):
    movie_id: StrictInt = Field(description="a movie id from the catalogue (GET /models)")
    rating: StrictFloat = Field(description="1 to 5 stars; half stars are rounded up")


class RecommendRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "ratings": [
                    {"movie_id": 50, "rating": 5},
                    {"movie_id": 172, "rating": 4.5},
                    {"movie_id": 1, "rating": 4},
                ],
                "k": 5,
            }
        }
    )
    ratings: list[RatingIn] = Field(
        description="the user's ratings; empty for a new user (cold start)"
    )
    k: StrictInt = Field(10, description="how many movies to recommend")


class PredictRatingsRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {"ratings": [{"movie_id": 50, "rating": 5}], "movie_ids": [1, 181]}
        }
    )
    ratings: list[RatingIn] = Field(description="the user's ratings")
    movie_ids: list[StrictInt] = Field(description="movies to predict")


class Recommendation(BaseModel):
    movie_id: int
    title: str
    predicted_rating: float = Field(description="expected rating, 1-5")


class RecommendResponse(BaseModel):
    model: str = Field(description="model tag, recommender:<version>")
    cold_start: bool = Field(description="true when no ratings were given")
    ranking: str = Field(description="'relevance', or 'popularity (no ratings given)'")
    recommendations: list[Recommendation]


class PredictedRating(BaseModel):
    movie_id: int
    predicted_rating: float


class PredictRatingsResponse(BaseModel):
    model: str = Field(description="model tag, recommender:<version>")
    cold_start: bool = Field(description="true when no ratings were given")
    predicted_ratings: list[PredictedRating]


class MovieSearch(BaseModel):
    """GET /recommender/movies's query parameters."""

    model_config = ConfigDict(extra="forbid")
    query: str = Field(
        "",
        max_length=200,
        description="words of the title, in any order, case and accents; "
        "empty lists the whole catalogue",
    )
    limit: int = Field(20, ge=1, le=100, description="most movies to list")


class Movie(BaseModel):
    movie_id: int
    title: str
    times_rated: int = Field(description="how many ratings it had in the training data")


class MoviesResponse(BaseModel):
    model: str = Field(description="model tag, recommender:<version>")
    matches: int = Field(
        description="how many movies match, of which `movies` lists the first `limit`"
    )
    movies: list[Movie] = Field(description="the matches, most-rated first")


@dataclass(frozen=True)
class Query:
    """What a request asks of its user's rows: k recommendations, or some movies' ratings."""

    user: UserRatings
    k: int | None = None
    movies: np.ndarray | None = None  # catalogue positions


def positions(runner: RecommenderRunner, movie_ids: list[int], where: str) -> np.ndarray:
    """Catalogue positions of movie ids; `where` names entry i ("ratings[{i}].movie_id")."""
    # Ids beyond int64 cannot be in the catalogue; -1 keeps them "unknown" below.
    ids = np.asarray([m if -(2**63) <= m < 2**63 else -1 for m in movie_ids], dtype=np.int64)
    found = runner.catalogue.positions(ids)
    unknown = np.flatnonzero(found < 0)
    if len(unknown):
        i = int(unknown[0])
        raise InputError(
            f"{where.format(i=i)}: movie {movie_ids[i]} is not in the "
            f"catalogue ({len(unknown)} unknown id(s) in all); "
            "see GET /models for the data the model was trained on"
        )
    return found


def user_ratings(
    runner: RecommenderRunner,
    ratings: list[tuple[int, float]],
    *,
    max_ratings: int,
    entry_at: str = "ratings[{i}]",
    movie_at: str = "ratings[{i}].movie_id",
    rating_at: str = "ratings[{i}].rating",
) -> UserRatings:
    """(movie_id, stars) pairs → a user; InputError names the first bad entry (the
    templates say how: entry i of the JSON list, or of the protocol's tensors)."""
    if len(ratings) > max_ratings:
        raise PayloadTooLarge(
            f"{movie_at.partition('[')[0]}: {len(ratings):,} ratings is more "
            f"than the limit of {max_ratings:,} per request"
        )
    ids = positions(runner, [m for m, _ in ratings], movie_at)
    if (
        levels := _levels_if_valid(ids, [stars for _, stars in ratings], len(runner.catalogue))
    ) is not None:
        return UserRatings(ids, levels)
    # Something is wrong: find the first bad entry, and say what.
    levels = np.empty(len(ratings), dtype=np.int8)
    for i, (_, stars) in enumerate(ratings):
        if not math.isfinite(stars) or not 1 <= stars <= 5:
            raise InputError(
                f"{rating_at.format(i=i)}: expected a number from 1 to 5, got {stars!r}"
            )
        try:
            levels[i] = rating_level(stars)
        except ValueError:
            raise InputError(
                f"{rating_at.format(i=i)}: expected whole or half stars "
                f"(1, 1.5, ..., 5), got {stars!r}"
            ) from None
    seen: dict[int, int] = {}
    for i, pos in enumerate(ids.tolist()):
        if pos in seen:
            raise InputError(
                f"{movie_at.format(i=i)}: movie {ratings[i][0]} is rated twice "
                f"(also at {entry_at.format(i=seen[pos])}); send one rating per "
                "movie"
            )
        seen[pos] = i
    return UserRatings(ids, levels)


def _levels_if_valid(ids: np.ndarray, stars: list[float], movies: int) -> np.ndarray | None:
    """rating_level of every rating at once, when all are whole or half stars from 1 to 5
    and no movie is rated twice; else None. For a user's 85 ratings the per-rating checks
    in user_ratings took ~85 µs of every recommend request's time on the event loop, this
    ~23 µs."""
    values = np.asarray(stars, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # 1e308 or NaN: refused below
        halves = values * 2
    valid = (
        np.isfinite(values).all()
        and ((values >= 1) & (values <= 5)).all()
        and (halves == np.floor(halves)).all()
        and distinct_positions(ids, movies) == len(ids)
    )
    return np.ceil(values).astype(np.int8) if valid else None


def _user(runner: RecommenderRunner, ratings: list[RatingIn], settings: Settings) -> UserRatings:
    return user_ratings(
        runner, [(r.movie_id, r.rating) for r in ratings], max_ratings=settings.max_ratings
    )


def prepare_recommend(
    runner: RecommenderRunner, request: RecommendRequest, settings: Settings
) -> Prepared:
    user = _user(runner, request.ratings, settings)
    if not 1 <= request.k <= len(runner.catalogue):
        raise InputError(
            f"k: expected a whole number from 1 to {len(runner.catalogue)} "
            f"(the catalogue's size), got {request.k!r}"
        )
    return Prepared([user], 1, Query(user, k=request.k))


def prepare_predict(
    runner: RecommenderRunner, request: PredictRatingsRequest, settings: Settings
) -> Prepared:
    user = _user(runner, request.ratings, settings)
    if not request.movie_ids:
        raise InputError("movie_ids: expected a non-empty list of movie ids")
    if len(request.movie_ids) > settings.max_ratings:
        raise PayloadTooLarge(
            f"movie_ids: {len(request.movie_ids):,} movies is more than the "
            f"limit of {settings.max_ratings:,} per request"
        )
    movies = positions(runner, request.movie_ids, "movie_ids[{i}]")
    return Prepared([user], 1, Query(user, movies=movies))


def recommendations(
    runner: RecommenderRunner,
    expected: np.ndarray,
    relevance: np.ndarray,
    user: UserRatings,
    k: int,
) -> list[Recommendation]:
    cat = runner.catalogue
    return [
        Recommendation(
            movie_id=int(cat.movie_ids[i]),
            title=cat.titles[i],
            predicted_rating=round(float(expected[i]), 4),
        )
        for i in runner.recommend(relevance, user, k)
    ]


def respond_recommend(
    runner: RecommenderRunner, prepared: Prepared, rows: Rows
) -> RecommendResponse:
    query: Query = prepared.context
    (expected,), (relevance,) = rows
    cold_start = not len(query.user)
    assert query.k is not None
    return RecommendResponse(
        model=runner.tag,
        cold_start=cold_start,
        ranking="popularity (no ratings given)" if cold_start else "relevance",
        recommendations=recommendations(runner, expected, relevance, query.user, query.k),
    )


def respond_predict(
    runner: RecommenderRunner, prepared: Prepared, rows: Rows
) -> PredictRatingsResponse:
    query: Query = prepared.context
    (expected,), _ = rows
    assert query.movies is not None
    ids = runner.catalogue.movie_ids
    return PredictRatingsResponse(
        model=runner.tag,
        cold_start=not len(query.user),
        predicted_ratings=[
            PredictedRating(movie_id=int(ids[i]), predicted_rating=round(float(expected[i]), 4))
            for i in query.movies
        ],
    )


def prepare_tensors(
    runner: RecommenderRunner,
    inputs: dict[str, np.ndarray],
    parameters: dict[str, Any],
    settings: Settings,
) -> Prepared:
    """One user per request: `rated_movie_ids` and their `ratings` (1-5 stars), both [R]
    (R may be 0: a new user); the parameter `k` (default 10) for the recommendations;
    optionally `movie_ids` [M], the movies whose expected rating to give."""
    ids, stars = inputs["rated_movie_ids"].ravel(), inputs["ratings"].ravel()
    if len(ids) != len(stars):
        raise InputError(
            f"ratings: {len(stars)} ratings for {len(ids)} rated_movie_ids; "
            "send one rating per movie"
        )
    user = user_ratings(
        runner,
        list(zip(ids.tolist(), stars.tolist(), strict=True)),
        max_ratings=settings.max_ratings,
        entry_at="rated_movie_ids[{i}]",
        movie_at="rated_movie_ids[{i}]",
        rating_at="ratings[{i}]",
    )
    k = parameter(parameters, "k", 10, int)
    if not 1 <= k <= len(runner.catalogue):
        raise InputError(
            f"parameters.k: expected a whole number from 1 to "
            f"{len(runner.catalogue)} (the catalogue's size), got {k}"
        )
    movies = None
    if "movie_ids" in inputs:
        asked = inputs["movie_ids"].ravel().tolist()
        if len(asked) > settings.max_ratings:
            raise PayloadTooLarge(
                f"movie_ids: {len(asked):,} movies is more than the limit "
                f"of {settings.max_ratings:,} per request"
            )
        movies = positions(runner, asked, "movie_ids[{i}]")
    return Prepared([user], 1, Query(user, k=k, movies=movies))


def tensor_outputs(
    runner: RecommenderRunner, prepared: Prepared, rows: Rows
) -> dict[str, np.ndarray]:
    query: Query = prepared.context
    (expected,), (relevance,) = rows
    assert query.k is not None
    top = runner.recommend(relevance, query.user, query.k)
    cat = runner.catalogue
    out = {
        "recommended_movie_ids": cat.movie_ids[top],
        "recommended_titles": np.array([cat.titles[i].encode() for i in top], dtype=object),
        "recommended_ratings": expected[top].astype(np.float32),
    }
    if query.movies is not None:
        out["predicted_ratings"] = expected[query.movies].astype(np.float32)
    return out


def find_movies(runner: RecommenderRunner, search: MovieSearch) -> MoviesResponse:
    """The catalogue's movies whose title matches, for a client to pick ids to rate."""
    cat = runner.catalogue
    found = cat.find(search.query)
    return MoviesResponse(
        model=runner.tag,
        matches=len(found),
        movies=[
            Movie(
                movie_id=int(cat.movie_ids[i]),
                title=cat.titles[i],
                times_rated=int(cat.popularity[i]),
            )
            for i in found[: search.limit]
        ],
    )


def movielens(settings: Settings) -> DataSource:
    folder = settings.data_dir / settings.movielens
    # Only MovieLens 100K is downloaded; a newer release is a folder the user provides.
    return DataSource(folder, settings.movielens_url if folder.name == "ml-100k" else None)


MODEL = ModelSpec(
    name="recommender",
    task="rating-prediction",
    summary="movie recommendations: a conditional RBM trained on MovieLens",
    runner=RecommenderRunner,
    routes=(
        Route(
            "/recommender/recommend",
            "The k movies the user has not rated that they are likeliest to watch and rate 4-5",
            RecommendResponse,
            prepare_recommend,
            respond_recommend,
            request=RecommendRequest,
        ),
        Route(
            "/recommender/predict",
            "The user's expected rating of each movie asked about",
            PredictRatingsResponse,
            prepare_predict,
            respond_predict,
            request=PredictRatingsRequest,
        ),
    ),
    tensors=Tensors(
        inputs=(
            TensorDecl("rated_movie_ids", ("INT64", "INT32"), (-1,)),
            TensorDecl("ratings", ("FP32", "FP64", "INT64", "INT32"), (-1,)),
            TensorDecl("movie_ids", ("INT64", "INT32"), (-1,), optional=True),
        ),
        outputs=(
            TensorDecl("recommended_movie_ids", ("INT64",), (-1,)),
            TensorDecl("recommended_titles", ("BYTES",), (-1,)),
            TensorDecl("recommended_ratings", ("FP32",), (-1,)),
            TensorDecl("predicted_ratings", ("FP32",), (-1,)),
        ),
        prepare=prepare_tensors,
        answer=tensor_outputs,
        parameters={"k": "how many movies to recommend (default 10)"},
        example={
            "inputs": [
                {
                    "name": "rated_movie_ids",
                    "datatype": "INT64",
                    "shape": [3],
                    "data": [50, 172, 1],
                },
                {"name": "ratings", "datatype": "FP32", "shape": [3], "data": [5, 4.5, 4]},
            ],
            "parameters": {"k": 5},
        },
    ),
    data=movielens,
    train=Ref("training.recommender:train"),
    export=Ref("export.recommender:export"),
    evaluate=Ref("evaluation.recommender:evaluate"),
    workload=Ref("bench.workloads:RECOMMENDER"),
    lookups=(
        Lookup(
            "/recommender/movies",
            "Search the catalogue by title: the movie ids the other routes take",
            MovieSearch,
            MoviesResponse,
            find_movies,
        ),
    ),
    scoring=Ref("scoring.recommender:SCORER"),
    # INT8 may cost at most 0.01 RMSE on u1.test; dynamic quantisation of the RBM's
    # weight matrices (MatMulInteger).
    precision=PrecisionPlan(metric="rmse", max_loss=0.01, higher_is_better=False),
    train_minutes=0.4,  # about 25 s on 2 cores
)
