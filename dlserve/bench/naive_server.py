"""The reference peer for `dlserve bench`: the FastAPI server people usually write by hand.

FastAPI + uvicorn, pydantic request models, one ONNX Runtime run per request, no batching
across requests: the usual tutorial pattern. It takes the same requests as the dlserve
service and gives the same answers, because it uses the same runners (session factory,
preprocessing, tokenizer, rating encoding); only the serving layer differs, which is what
the benchmark compares. Run it with

    DLSERVE_MODELS=digits uvicorn dlserve.bench.naive_server:app --port 8000

It is a baseline for measurements, not a second product: no metrics, no readiness checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, StrictFloat, StrictInt

from dlserve.errors import InputError
from dlserve.models import load_runner
from dlserve.models.digits import parse_digits_request
from dlserve.settings import get_settings

settings = get_settings()
runners = {name: load_runner(name, settings) for name in settings.models}
for _runner in runners.values():
    _runner.warm_up()
app = FastAPI(title="naive baseline")


class DigitsRequest(BaseModel):
    images: list[list[list[float]]] | None = None
    images_base64: list[str] | None = None


class SentimentRequest(BaseModel):
    texts: list[str]


class Rating(BaseModel):
    movie_id: StrictInt
    rating: StrictFloat


class RecommendRequest(BaseModel):
    ratings: list[Rating]
    k: StrictInt = 10


def _run(name: str, parse: Callable[[Any], Any]) -> tuple[Any, Any, Any]:
    """Parse one request with the model's own checks and run it alone: (runner, input, output)."""
    if name not in runners:
        raise HTTPException(404, f"model {name!r} is not loaded")
    runner = runners[name]
    try:
        payload = parse(runner)
    except InputError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    (result,) = runner.run_batch([payload])
    return runner, payload, result


@app.post("/digits/predict")
def digits_predict(req: DigitsRequest) -> dict[str, Any]:
    runner, _, probs = _run("digits", lambda _: parse_digits_request(
        req.images, req.images_base64, max_items=settings.max_items_per_request))
    return {"model": runner.tag, "predictions": runner.format(probs)}


@app.post("/sentiment/predict")
def sentiment_predict(req: SentimentRequest) -> dict[str, Any]:
    runner, _, probs = _run("sentiment", lambda r: r.parse_texts(
        req.texts, max_items=settings.max_items_per_request, max_chars=settings.max_text_chars))
    return {"model": runner.tag, "predictions": runner.format(probs)}


@app.post("/recommender/recommend")
def recommender_recommend(req: RecommendRequest) -> dict[str, Any]:
    pairs = [(r.movie_id, r.rating) for r in req.ratings]
    runner, queries, rows = _run("recommender", lambda r: r.parse_query(
        pairs, max_ratings=settings.max_ratings, k=req.k))
    return {"model": runner.tag, **runner.answer(queries[0], rows[0])}
