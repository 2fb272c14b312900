"""dlserve's request path: body → contract → batcher → answer, for every predict route and
the Open Inference Protocol's infer route alike.

`serve` takes one request of one model: it waits out a model still loading, checks and
prepares the input (`prepare`, on a thread when the body is large), queues it on the
model's adaptive batcher, and writes the answer (`respond`). A client mistake is reported
here, once, by whichever step finds it: a 4xx with `{"error": ...}` naming the field,
counted in dlserve_errors_total. `answer` is `serve` for a registry route: parse the body
with the route's request type, and write the route's response type.

The guard (service/guard.py) hands each POST to a predict route straight to `answer`,
with the body it has already read within the size limit; BentoML's own endpoint for the
route (declared in service/app.py, so that /docs.json, /schema.json and BentoML's client
know it) calls `answer_parsed` with the request BentoML has parsed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.responses import Response

from dlserve import progress
from dlserve.errors import InputError
from dlserve.prepared import Prepared
from dlserve.registry import Route
from service import payload_log
from service.batching import Call, Overloaded, Shed
from service.state import Serving, WorkerState

# Bodies bigger than this (JSON, text, an image file) take 10 ms or more to parse and
# prepare, so that is done off the event loop, where it would stall every other request,
# on the worker's one preparing thread (WorkerState.preparing): the work is Python, which holds
# the GIL, so more threads would only contend for it; and a request whose client hangs up
# while it waits for that thread is never prepared at all. With asyncio's default pool (6
# threads here), the 6 preparations under way when 64 clients hung up ran on and held an
# ordinary request sent after them for up to 1 s.
HEAVY_BYTES = 100_000
JSON = "application/json"
LOADING = "the models are still loading; retry shortly"
TRAINING_RETRY_S = 60  # the longest Retry-After for a model still training


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer (orjson); also an ASGI app, which is how the guard sends its refusals."""
    return Response(orjson.dumps(data), status_code=status, media_type=JSON, headers=headers)


def error(
    state: WorkerState,
    model: str,
    status: int,
    message: str,
    reason: str,
    headers: dict[str, str] | None = None,
) -> Response:
    state.metrics.errors.labels(model=model, reason=reason).inc()
    return json_response({"error": message}, status, headers)


async def unless_loaded(state: WorkerState, model: str | None = None) -> Response | None:
    """None once the worker's models are loaded (waiting a while for them:
    `WorkerState.wait_until_loaded`); otherwise the 503 to answer with.

    A request to `model` is counted in dlserve_errors_total (reason `loading`). GET /models
    (`model` None) belongs to no model: it is not counted, and says instead why a worker
    whose models failed to load cannot answer (no Retry-After: waiting will not help)."""
    if state.ready or await state.wait_until_loaded():
        return None
    if model is not None:
        return error(state, model, 503, LOADING, "loading", {"Retry-After": "1"})
    if state.load_error is not None:
        return json_response(
            {"error": f"this worker could not load the models: {state.load_error}"}, 503
        )
    return json_response({"error": LOADING}, 503, {"Retry-After": "1"})


def unloaded_message(state: WorkerState, model: str) -> str:
    if model in state.training:
        return training_message(state, model)
    why = state.unloaded.get(model, "it is not loaded")
    return (
        f"model {model} is not being served: {why}; POST /v2/repository/models/{model}/load "
        "loads it again"
    )


def training_message(state: WorkerState, model: str) -> str:
    """What a client of a model that `dlserve serve` is still training is told."""
    return _training_refusal(model, progress.read(state.settings.artifacts_dir / model))[0]


def _training_refusal(model: str, found: progress.Progress | None) -> tuple[str, str]:
    """The message for a model still training, from its training's progress (one read of
    its file per request), and the seconds to wait before asking again: its expected
    time, at least a second and at most TRAINING_RETRY_S (Retry-After)."""
    how_far = found.describe() if found is not None else "its training has not started yet"
    message = f"model {model} is still being trained by `dlserve serve` ({how_far}); retry later"
    remaining = found.remaining_s() if found is not None else None
    return message, str(min(max(int(remaining or TRAINING_RETRY_S), 1), TRAINING_RETRY_S))


async def serve(
    state: WorkerState,
    model: str,
    prepare: Callable[[Any], Prepared],
    respond: Callable[[Any, Prepared, Any], Response],
    *,
    heavy: bool = False,
    call: Call | None = None,
) -> Response:
    """One request to `model`: `prepare(runner)` checks and preprocesses it,
    `respond(runner, prepared, result)` writes the answer; either may raise InputError.

    `call` (from the guard) carries the request's deadline, and says whether its client
    has gone: the guard cancels this coroutine when the client hangs up, which withdraws
    its queued work (service/batching.py); that is counted here, by the stage it reached."""
    # (checked inline first: the await costs every request once the models are loaded)
    if not state.ready and (refusal := await unless_loaded(state, model)) is not None:
        return refusal
    serving = state.serving.get(model)
    if serving is None:  # still training, or unloaded through the model repository routes
        if model in state.training:
            found = progress.read(state.settings.artifacts_dir / model)
            message, wait_s = _training_refusal(model, found)
            return error(state, model, 503, message, "training", {"Retry-After": wait_s})
        return error(state, model, 503, unloaded_message(state, model), "unloaded")
    picked = serving.pick()  # one version, start to end
    if state.payload_log is not None:  # the log records which version answered
        payload_log.ANSWERED.set(payload_log.Answered(picked.tag, picked is not serving))
    serving = picked
    if serving.counted is None:
        return await _serve(state, model, serving, prepare, respond, heavy, call)
    started = time.perf_counter()
    response = await _serve(state, model, serving, prepare, respond, heavy, call)
    serving.counted.count(response.status_code, time.perf_counter() - started)
    return response


async def _serve(
    state: WorkerState,
    model: str,
    serving: Serving,
    prepare: Callable[[Any], Prepared],
    respond: Callable[[Any, Prepared, Any], Response],
    heavy: bool,
    call: Call | None,
) -> Response:
    runner, batcher = serving.runner, serving.batcher
    started = time.perf_counter()
    try:
        if heavy:
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(state.preparing, prepare, runner)
        else:
            prepared = prepare(runner)
    except InputError as exc:
        return error(state, model, exc.status, str(exc), f"http_{exc.status}")
    except asyncio.CancelledError:
        _count_abandoned(state, model, call)
        raise
    state.preprocess_seconds[model].observe(time.perf_counter() - started)
    try:
        result = await batcher.submit(prepared.part, prepared.items, call)
    except (Overloaded, Shed) as exc:
        reason = "overloaded" if isinstance(exc, Overloaded) else "deadline"
        state.metrics.shed.labels(model=model, reason=reason).inc()
        return error(state, model, 503, str(exc), reason, {"Retry-After": str(exc.retry_after_s)})
    except asyncio.CancelledError:
        _count_abandoned(state, model, call)
        raise
    try:
        return respond(runner, prepared, result)
    except InputError as exc:  # an output asked for that this request cannot give
        return error(state, model, exc.status, str(exc), f"http_{exc.status}")


def _count_abandoned(state: WorkerState, model: str, call: Call | None) -> None:
    """Count a request whose client hung up, by how far it got: preparing (its input was
    being checked; nothing of it ran), queued (withdrawn before any model run), running
    (its model run finishes; nothing after it runs)."""
    if call is not None and call.gone:
        state.metrics.abandoned.labels(model=model, stage=call.stage).inc()


def _respond(route: Route) -> Callable[[Any, Prepared, Any], Response]:
    def respond(runner: Any, prepared: Prepared, result: Any) -> Response:
        answered = route.respond(runner, prepared, result)
        return Response(answered.model_dump_json(), media_type=JSON)

    return respond


async def answer(
    state: WorkerState, model: str, route: Route, body: bytes, call: Call | None = None
) -> Response:
    """The response to one request to a registry route, from its raw body."""
    settings = state.settings
    return await serve(
        state,
        model,
        lambda runner: route.prepare(runner, route.parse(body), settings),
        _respond(route),
        heavy=len(body) > HEAVY_BYTES,
        call=call,
    )


async def answer_parsed(state: WorkerState, model: str, route: Route, request: Any) -> Response:
    """The response to one request to a registry route that BentoML has parsed already."""
    settings = state.settings
    return await serve(
        state, model, lambda runner: route.prepare(runner, request, settings), _respond(route)
    )
