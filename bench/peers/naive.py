"""The reference peer for `dlserve bench`: the FastAPI server people usually write by hand.

FastAPI + uvicorn, pydantic request models, one ONNX Runtime run per request, no batching
across requests: the usual tutorial pattern. It serves every route of every model in
DLSERVE_MODELS with the same contracts as the service (the registry's request types,
checks and answers) and the same runners (session factory, preprocessing, tokenizer,
rating encoding), so only the serving layer differs, which is what the benchmark
compares. Run it with

    DLSERVE_MODELS=digits uvicorn bench.peers.naive:app --port 8000

It is a baseline for measurements, not a second product: no metrics, no readiness checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel

from dlserve import registry
from dlserve.errors import InputError
from dlserve.registry import Route
from dlserve.runners.base import Runner
from dlserve.settings import get_settings

settings = get_settings()
app = FastAPI(title="naive baseline")


def answer(runner: Runner[Any, Any], route: Route, request: Any) -> dict[str, Any]:
    """Check and prepare one request with the model's contract, and run it alone."""
    try:
        prepared = route.prepare(runner, request, settings)
    except InputError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    (result,) = runner.run_batch([prepared.part])
    return route.respond(runner, prepared, result).model_dump()


def endpoint(runner: Runner[Any, Any], route: Route) -> Callable[..., Any]:
    """A FastAPI endpoint for `route`: its body typed with the route's request model, or,
    for a file route, read raw."""
    if route.request is None:

        async def take_file(request: Request) -> dict[str, Any]:
            return answer(runner, route, await request.body())

        return take_file

    def take_json(body: BaseModel) -> dict[str, Any]:
        return answer(runner, route, body)

    take_json.__annotations__ = {"body": route.request, "return": dict[str, Any]}
    return take_json


for spec in registry.serving(settings).values():
    model_runner = spec.load_runner(settings)
    model_runner.warm_up()
    for model_route in spec.routes:
        app.add_api_route(
            model_route.path,
            endpoint(model_runner, model_route),
            methods=["POST"],
            response_model=model_route.response,
        )
