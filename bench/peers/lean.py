"""The lean hand-written peer: Starlette + orjson + one ONNX Runtime run per request.

What a performance-minded engineer writes in thirty lines: parse the body with orjson,
turn it into the model's input with numpy and dlserve's own preprocessing (the same
tokenizer and rating encoding, the same runner), run it alone, write the answer with
orjson. No validation beyond what numpy and the preprocessing do, no batching, no
metrics, no limits. Run it with

    DLSERVE_MODELS=digits uvicorn bench.peers.lean:app --port 8000 --workers 2
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from dlserve import registry
from dlserve.models.recommender import user_ratings
from dlserve.settings import get_settings

settings = get_settings()
runners = {name: registry.load_runner(name, settings) for name in settings.models}
for _runner in runners.values():
    _runner.warm_up()


def answer(data: Any) -> Response:
    return Response(orjson.dumps(data), media_type="application/json")


async def digits(request: Request) -> Response:
    runner = runners["digits"]
    pixels = np.asarray(orjson.loads(await request.body())["images"], dtype=np.float32)
    (probs,) = runner.run_batch([pixels])
    return answer(
        {
            "model": runner.tag,
            "predictions": [
                {
                    "digit": int(row.argmax()),
                    "confidence": float(row.max()),
                    "probabilities": row.round(6).tolist(),
                }
                for row in probs
            ],
        }
    )


async def sentiment(request: Request) -> Response:
    runner = runners["sentiment"]
    texts = orjson.loads(await request.body())["texts"]
    (probs,) = runner.run_batch([[runner.encode(t) for t in texts]])
    return answer(
        {
            "model": runner.tag,
            "predictions": [
                {
                    "label": runner.labels[int(row.argmax())],
                    "positive_probability": float(row[runner.labels.index("positive")]),
                }
                for row in probs
            ],
        }
    )


async def recommend(request: Request) -> Response:
    runner = runners["recommender"]
    body = orjson.loads(await request.body())
    user = user_ratings(
        runner,
        [(r["movie_id"], r["rating"]) for r in body["ratings"]],
        max_ratings=settings.max_ratings,
    )
    (((expected,), (relevance,)),) = runner.run_batch([[user]])
    cat = runner.catalogue
    return answer(
        {
            "model": runner.tag,
            "recommendations": [
                {
                    "movie_id": int(cat.movie_ids[i]),
                    "title": cat.titles[i],
                    "predicted_rating": round(float(expected[i]), 4),
                }
                for i in runner.recommend(relevance, user, body.get("k", 10))
            ],
        }
    )


HANDLERS: dict[str, tuple[str, Callable[[Request], Awaitable[Response]]]] = {
    "/digits/predict": ("digits", digits),
    "/sentiment/predict": ("sentiment", sentiment),
    "/recommender/recommend": ("recommender", recommend),
}
app = Starlette(
    routes=[
        Route("/health", lambda _: PlainTextResponse("ok")),
        *(
            Route(path, handler, methods=["POST"])
            for path, (model, handler) in HANDLERS.items()
            if model in runners
        ),
    ]
)
