"""The dlserve BentoML service: every configured model behind batched HTTP routes.

Run it with `dlserve serve` (or `bentoml serve service.app:DLServe`). The server refuses
to start if a model does not match its manifest (service/lifecycle.py). Each worker then
loads the models from BentoML's model store, warms them up, and only then reports ready
on /readyz. Every request passes the guard (service/guard.py: API key, body type and
size, concurrency cap); predict routes parse and check their input, queue it on the
model's adaptive batcher, and answer `{"model": "<tag>", "predictions": [...]}`; a client
mistake gets a 4xx with `{"error": "..."}` that names the field. Imports no torch.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable, Sized
from typing import Annotated, Any

import bentoml
from bentoml.validators import ContentType
from pydantic import BaseModel, Field, StrictFloat, StrictInt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dlserve.errors import InputError
from dlserve.models import load_runner
from dlserve.models.base import Runner
from dlserve.models.digits import image_file_to_pixels, parse_digits_request
from dlserve.settings import get_settings
from service.batching import AdaptiveBatcher, Overloaded
from service.bentoml_patches import drop_bentoml_timeout
from service.guard import RequestGuard
from service.lifecycle import install_drain, verify_models
from service.metrics import get_metrics
from service.responses import json_response

log = logging.getLogger("dlserve.service")
GC_GEN0_THRESHOLD = 20_000
# Requests bigger than this (characters of text, bytes of image file) take 10 ms or more to
# prepare, so they are prepared off the event loop.
HEAVY_BYTES = 100_000
settings = get_settings()


class DigitPrediction(BaseModel):
    digit: int
    confidence: float
    probabilities: list[float]


class DigitsResponse(BaseModel):
    model: str = Field(description="model tag, digits:<version>")
    predictions: list[DigitPrediction]


class SentimentPrediction(BaseModel):
    label: str = Field(description="positive or negative")
    positive_probability: float


class SentimentResponse(BaseModel):
    model: str = Field(description="model tag, sentiment:<version>")
    predictions: list[SentimentPrediction]


class RatingIn(BaseModel):
    movie_id: StrictInt = Field(description="a movie id from the catalogue (GET /models)")
    rating: StrictFloat = Field(description="1 to 5 stars; half stars are rounded up")


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


async def list_models(_: Request) -> Response:
    service = bentoml.get_current_service()
    return json_response({"models": [r.describe() for r in service.runners.values()]})


# GET /models, mounted after BentoML's own routes (APIs, /livez, /readyz, /metrics).
extra_routes = Starlette(routes=[Route("/models", list_models, methods=["GET"])])


def tune_gc() -> None:
    """Make garbage collection cheap for a long-running server.

    Everything loaded at start-up (BentoML, pydantic models, ONNX sessions) lives as long
    as the process, yet each full collection walks it all again; and every JSON request
    allocates thousands of short-lived objects, which with the default gen-0 threshold
    (700) triggers collections many times per request. Freezing the start-up heap and
    raising the gen-0 threshold lifted single-image digits throughput by about 40 % and cut
    p99 latency 3-4× at 64 clients (BENCHMARKS.md); reference cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 50, 100)


def declare_models(cls: type) -> type:
    """Declare each configured model the way BentoML expects (a BentoModel class attribute),
    so that `bentoml build` packages them into the Bento with the service."""
    for name in settings.models:
        setattr(cls, f"{name}_model", bentoml.models.BentoModel(f"{name}:latest"))
    return cls


@bentoml.asgi_app(extra_routes, path="/")
@bentoml.service(
    name="dlserve",
    workers=settings.workers,
    # Enforced by the guard; BentoML's own copy is dropped (service/bentoml_patches.py).
    traffic={"timeout": settings.request_timeout_s},
    http={"port": settings.port},
    # One log line per request costs more than a digits prediction; off unless asked for.
    logging={"access": {"enabled": settings.access_log}},
    # BentoML wraps every request in an OpenTelemetry span even when no exporter is set
    # up; that cost 40 % of digits throughput here, so routes are traced only when asked.
    tracing={"excluded_urls": "" if settings.tracing else ".*"},
)
@declare_models
class DLServe:
    def __init__(self) -> None:
        self.metrics = get_metrics()
        self.runners: dict[str, Runner] = {}
        self.batchers: dict[str, AdaptiveBatcher] = {}
        self.ready = self.draining = False
        self.load_error: str | None = None
        install_drain(self.begin_drain, settings.drain_delay_s, settings.drain_timeout_s)
        # Loading off the event loop lets /livez answer while models load (/readyz: 503).
        threading.Thread(target=self._load_models, name="dlserve-load", daemon=True).start()

    def _load_models(self) -> None:
        try:
            for name in settings.models:
                runner = load_runner(name, settings)
                runner.warm_up()
                self.batchers[name] = self._batcher(runner)
                self.runners[name] = runner
                self.metrics.model_info.labels(
                    model=name, version=runner.stored.version,
                    sha256=runner.stored.manifest.onnx_sha256, provider=runner.provider).set(1)
                log.info("loaded %s on %s", runner.tag, runner.provider)
        except Exception as exc:  # noqa: BLE001 - whatever it was, this worker cannot serve
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("could not load the models: this worker stays not ready and "
                          "reports not alive on /livez")
            return
        tune_gc()
        self.ready = True

    def begin_drain(self) -> None:
        self.draining = True

    def _batcher(self, runner: Runner) -> AdaptiveBatcher:
        inference = self.metrics.inference_seconds.labels(model=runner.name,
                                                          provider=runner.provider)
        batch_items = self.metrics.batch_items.labels(model=runner.name)
        items_predicted = self.metrics.items_predicted.labels(model=runner.name)

        def on_batch(items: int, seconds: float) -> None:
            inference.observe(seconds)
            batch_items.observe(items)
            items_predicted.inc(items)

        return AdaptiveBatcher(
            runner.name, runner.run_batch,
            max_batch_size=settings.max_batch_size if settings.batching else 1,
            max_queue_items=settings.max_queue_items,
            max_wait_s=settings.batch_wait_ms / 1000.0,
            on_batch=on_batch,
        )

    async def _wait_until_loaded(self) -> bool:
        """Whether the models are loaded, waiting up to half the request timeout for them.

        A worker that circus starts next to a serving one (after a crash) accepts
        connections before its models are loaded, and clients that reconnect land there
        too; waiting out the load (seconds) serves them instead of failing them. /readyz
        still says 503 meanwhile, so a load balancer sends no traffic to a server that has
        no ready worker at all."""
        deadline = time.monotonic() + settings.request_timeout_s / 2
        while not self.ready and self.load_error is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.ready

    async def __is_ready__(self) -> bool:
        return self.ready and not self.draining

    async def __is_alive__(self) -> bool:
        return self.load_error is None

    async def _predict(self, model: str, prepare: Callable[[Any], Sized],
                       respond: Callable[[Any, Any], dict[str, Any]] | None = None,
                       *, heavy: bool = False) -> Response:
        """Prepare one request's items, run them through the batcher, format the answer:
        `respond(payload, result)` gives the body, by default {"predictions": [...]}.
        A `heavy` request is prepared on a thread, so that tokenising megabytes of text or
        decoding a large image does not stall every other request and health check."""
        if model not in settings.models:
            return json_response({"error": f"model {model!r} is not served here "
                                  f"(DLSERVE_MODELS={','.join(settings.models)})"}, 404)
        if not self.ready and not await self._wait_until_loaded():
            return json_response({"error": "the models are still loading; retry shortly"},
                                 503, {"Retry-After": "1"})
        runner = self.runners[model]
        started = time.perf_counter()
        try:
            payload = await asyncio.to_thread(prepare, runner) if heavy else prepare(runner)
        except InputError as exc:
            self.metrics.errors.labels(model=model, reason=f"http_{exc.status}").inc()
            return json_response({"error": str(exc)}, exc.status)
        self.metrics.preprocess_seconds.labels(model=model).observe(
            time.perf_counter() - started)
        try:
            result = await self.batchers[model].submit(payload, len(payload))
        except Overloaded as exc:
            self.metrics.errors.labels(model=model, reason="overloaded").inc()
            return json_response({"error": str(exc)}, 503,
                                 {"Retry-After": str(exc.retry_after_s)})
        body = respond(payload, result) if respond else {"predictions": runner.format(result)}
        return json_response({"model": runner.tag, **body})

    @bentoml.api(route="/digits/predict", output_spec=DigitsResponse)
    async def digits_predict(
        self,
        images: Annotated[list[list[list[StrictFloat]]] | None, Field(
            description="28×28 arrays of pixel values 0-255, ink bright on dark (as MNIST)")
        ] = None,
        images_base64: Annotated[list[str] | None, Field(
            description="the compact form of `images`: each image the base64 of its 784 "
                        "uint8 pixels, row by row; send one of the two fields")] = None,
    ) -> Response:
        return await self._predict("digits", lambda _: parse_digits_request(
            images, images_base64, max_items=settings.max_items_per_request))

    @bentoml.api(route="/digits/predict_image", output_spec=DigitsResponse)
    async def digits_predict_image(
        self, image: Annotated[bytes, ContentType("image/*")], /
    ) -> Response:
        """One PNG or JPEG file as the request body; any size, colour and polarity."""
        return await self._predict(
            "digits", lambda _: image_file_to_pixels(image, max_pixels=settings.max_image_pixels),
            heavy=len(image) > HEAVY_BYTES)

    @bentoml.api(route="/sentiment/predict", output_spec=SentimentResponse)
    async def sentiment_predict(
        self,
        texts: Annotated[list[str], Field(
            description="English texts, any length (only the first tokens are read; see "
                        "DLSERVE_MAX_TEXT_CHARS for the longest accepted)")],
    ) -> Response:
        return await self._predict("sentiment", lambda runner: runner.parse_texts(
            texts, max_items=settings.max_items_per_request,
            max_chars=settings.max_text_chars), heavy=sum(map(len, texts)) > HEAVY_BYTES)

    @bentoml.api(route="/recommender/recommend", output_spec=RecommendResponse)
    async def recommender_recommend(
        self,
        ratings: Annotated[list[RatingIn], Field(
            description="the user's ratings; empty for a new user (cold start)")],
        k: Annotated[StrictInt, Field(description="how many movies to recommend")] = 10,
    ) -> Response:
        """The k movies the user has not rated that they are likeliest to watch and rate 4-5."""
        return await self._recommender(ratings, k=k)

    @bentoml.api(route="/recommender/predict", output_spec=PredictRatingsResponse)
    async def recommender_predict(
        self,
        ratings: Annotated[list[RatingIn], Field(description="the user's ratings")],
        movie_ids: Annotated[list[StrictInt], Field(description="movies to predict")],
    ) -> Response:
        """The user's expected rating of each movie asked about."""
        return await self._recommender(ratings, movie_ids=movie_ids)

    async def _recommender(self, ratings: list[RatingIn], **query: Any) -> Response:
        pairs = [(r.movie_id, r.rating) for r in ratings]
        return await self._predict(
            "recommender",
            lambda runner: runner.parse_query(pairs, max_ratings=settings.max_ratings, **query),
            lambda payload, rows: self.runners["recommender"].answer(payload[0], rows[0]))


# Refuse a server whose models do not match their manifests before any worker starts.
verify_models(settings.models)
drop_bentoml_timeout()
# Refuses what it must before anything reads the body; edits responses on their way out.
DLServe.add_asgi_middleware(RequestGuard)
