"""dlserve's request path for the predict routes: body → contract → batcher → answer.

Every predict route is a `dlserve.registry.Route`, and one function serves them all:
parse the body with the route's request type, check and preprocess it (`route.prepare`),
queue it on the model's adaptive batcher, and write the route's response type. A client
mistake is reported here, once, by whichever step finds it: a 4xx with `{"error": ...}`
naming the field, counted in dlserve_errors_total.

The guard (service/guard.py) hands each POST to a predict route straight to `answer`,
with the body it has already read within the size limit; BentoML's own endpoint for the
route (declared in service/app.py, so that /docs.json, /schema.json and BentoML's client
know it) calls the same function with the request BentoML has parsed.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response

from dlserve.errors import InputError
from dlserve.registry import Prepared, Route
from service.batching import Overloaded

if TYPE_CHECKING:
    from service.app import DLServe

# Bodies bigger than this (JSON, text, an image file) take 10 ms or more to parse and
# prepare, so that is done off the event loop, where it would stall every other request.
HEAVY_BYTES = 100_000
JSON = "application/json"


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer (orjson); also an ASGI app, which is how the guard sends its refusals."""
    return Response(orjson.dumps(data), status_code=status, media_type=JSON, headers=headers)


def error(service: DLServe, model: str, status: int, message: str, reason: str,
          headers: dict[str, str] | None = None) -> Response:
    service.metrics.errors.labels(model=model, reason=reason).inc()
    return json_response({"error": message}, status, headers)


async def answer(service: DLServe, model: str, route: Route, body: bytes) -> Response:
    """The response to one request to `route`, from its raw body."""
    heavy = len(body) > HEAVY_BYTES
    return await answer_parsed(service, model, route, None, body=body, heavy=heavy)


async def answer_parsed(service: DLServe, model: str, route: Route, request: Any, *,
                        body: bytes | None = None, heavy: bool = False) -> Response:
    """The response to one request: `request` already parsed, or its raw `body`."""
    if not service.ready and not await service.wait_until_loaded():
        return error(service, model, 503, "the models are still loading; retry shortly",
                     "loading", {"Retry-After": "1"})
    runner = service.runners[model]
    settings = service.settings
    started = time.perf_counter()

    def prepare() -> Prepared:
        parsed = route.parse(body) if body is not None else request
        return route.prepare(runner, parsed, settings)

    try:
        prepared = await asyncio.to_thread(prepare) if heavy else prepare()
    except InputError as exc:
        return error(service, model, exc.status, str(exc), f"http_{exc.status}")
    service.metrics.preprocess_seconds.labels(model=model).observe(
        time.perf_counter() - started)
    try:
        result = await service.batchers[model].submit(prepared.part, prepared.items)
    except Overloaded as exc:
        return error(service, model, 503, str(exc), "overloaded",
                     {"Retry-After": str(exc.retry_after_s)})
    answered = route.respond(runner, prepared, result)
    return Response(answered.model_dump_json(), media_type=JSON)
