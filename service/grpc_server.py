"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` and
`grpc.health.v1.Health`, served by every worker on DLSERVE_GRPC_PORT (0: off).

BentoML 1.4 serves no gRPC for `@bentoml.service` classes, so this is a grpc.aio server of
dlserve's own, one per worker process, on the worker's own event loop: ModelInfer calls
`predict.serve` exactly as the REST infer route does (the same checks, the same adaptive
batcher, whose queue lives on that loop, and the same metrics), with no thread hop.
grpc.aio runs on uvicorn's uvloop: its completion queue is polled by grpc's own thread,
which wakes the loop through a file descriptor. A grpc.aio server on a thread and loop of
its own, handing each call to the worker's loop (run_coroutine_threadsafe), was slower:
with a handler that awaits a future the loop resolves (as the batcher's), one client
calling in turn got 924-1,040 calls/s against 1,215-1,237 here, 16 clients a median of
1,157 against 1,728 (3 rounds each, docs/grpc.md). The workers share the port through
SO_REUSEPORT (grpcio's default on Linux): the kernel spreads new connections over them;
a second server would share it as silently, so `dlserve serve` checks that the port is
free first (cli/serve.py, check_ports_free).
A worker starts listening only once its models are loaded, so no connection lands on a
worker that cannot answer yet; on SIGTERM it reports NOT_SERVING at once, stops accepting
DLSERVE_DRAIN_DELAY_S later and lets calls in flight finish (service/app.py).

Each call meets what the guard (service/guard.py) does for HTTP:
- `authorization: Bearer <key>` metadata when DLSERVE_API_KEY is set (UNAUTHENTICATED
  otherwise); the health service, and ServerLive/ServerReady while their REST twins are in
  DLSERVE_OPEN_PATHS, need none;
- messages over DLSERVE_MAX_BODY_BYTES are refused by grpc itself (RESOURCE_EXHAUSTED);
- at most DLSERVE_MAX_CONCURRENCY requests in hand per worker, HTTP's counted too
  (RESOURCE_EXHAUSTED);
- the deadline is the client's grpc-timeout, capped by DLSERVE_REQUEST_TIMEOUT_S: work that
  cannot start in time is refused (UNAVAILABLE), as HTTP's 503;
- a call the client cancels, or whose deadline passes, withdraws its queued work
  (service/batching.py) and counts in dlserve_requests_abandoned_total.
Client mistakes keep their HTTP status's meaning (`CODES`): INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED, each with the message the REST route gives, never INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import orjson
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.requests import Request
from starlette.responses import Response

from dlserve.errors import InputError
from dlserve.prepared import Prepared
from dlserve.settings import Settings
from service import grpc_inference_pb2 as pb
from service import grpc_tensors, predict, protocol, repository
from service.batching import Call
from service.guard import requests_in_flight
from service.state import WorkerState

log = logging.getLogger("dlserve.service")

SERVICE = "inference.GRPCInferenceService"
# The HTTP status of a refusal → the gRPC code that means the same (grpc's own mapping,
# https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md, and Triton's).
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.FAILED_PRECONDITION,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# The REST twins of the methods that may be open (no API key), as DLSERVE_OPEN_PATHS says.
OPEN_TWINS = {"ServerLive": "/v2/health/live", "ServerReady": "/v2/health/ready"}
# How often Health.Watch looks for a change of status.
WATCH_POLL_S = 0.5
# A connection is asked to close (GOAWAY) after this long, so that a client with one
# long-lived connection moves between the workers sharing the port, as HTTP's
# DLSERVE_KEEPALIVE_REQUESTS does (service/guard.py); calls in flight finish first.
MAX_CONNECTION_AGE_MS = 60_000

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class Refused(Exception):
    """A call answered with a gRPC status and a message that names the problem."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: str | None = None):
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


def refusal(response: Response) -> Refused:
    """The gRPC refusal for a REST error response ({"error": ...}) of the shared code."""
    message = orjson.loads(bytes(response.body)).get("error", "refused")
    code = CODES.get(response.status_code, grpc.StatusCode.INTERNAL)
    return Refused(code, message, response.headers.get("retry-after"))


class Inference:
    """The methods of inference.GRPCInferenceService, over one worker's state."""

    def __init__(self, state: WorkerState, ready: Callable[[], Awaitable[bool]]) -> None:
        self.state = state
        self.ready = ready  # the worker's /readyz answer

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=self.state.load_error is None)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=await self.ready())

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(**protocol.metadata(self.state.settings))

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        found = protocol.loaded(self.state, request.name, request.version or None)
        if isinstance(found, Response) and found.status_code == 404:
            raise refusal(found)
        return pb.ModelReadyResponse(ready=not isinstance(found, Response))

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        found = protocol.loaded(self.state, request.name, request.version or None)
        if isinstance(found, Response):
            raise refusal(found)
        runner, tensors = found
        described = tensors.metadata(runner.name, runner.stored.version, protocol.PLATFORM)
        return pb.ModelMetadataResponse(**described)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Returns the serialised ModelInferResponse (the method's serialiser passes bytes
        through): it is made by `respond` on the shared request path, which writes bytes."""
        state, name = self.state, request.model_name
        if (refused := protocol.unserved(state, name)) is not None:
            raise refusal(refused)
        tensors, settings = state.specs[name].tensors, state.settings
        assert tensors is not None  # (unserved says so)
        version = request.model_version or None
        raw = bool(request.raw_input_contents)

        def prepare(runner: Any) -> Prepared:
            protocol.check_version(runner, version)
            decoded = grpc_tensors.decode(request, tensors, max_body=settings.max_body_bytes)
            return protocol.prepare_decoded(runner, tensors, decoded, settings)

        def respond(runner: Any, prepared: Prepared, result: Any) -> Response:
            decoded, arrays, wanted = protocol.answer_decoded(runner, tensors, prepared, result)
            message = grpc_tensors.encode(
                name, runner.stored.version, decoded, arrays, wanted, raw=raw
            )
            return Response(message.SerializeToString())

        # The client's deadline (grpc-timeout), capped by the server's: grpc itself cancels
        # the call at the client's (counted as abandoned, like a hang-up), this at the cap.
        left, cap = context.time_remaining(), settings.request_timeout_s
        call = Call(deadline=time.perf_counter() + (cap if left is None else min(left, cap)))
        timeout_s = cap if left is None or cap < left else None
        heavy = request.ByteSize() > predict.HEAVY_BYTES
        task = asyncio.ensure_future(
            predict.serve(state, name, prepare, respond, heavy=heavy, call=call)
        )
        try:
            async with asyncio.timeout(timeout_s):
                # Shielded, so that a cancel marks the call gone before its work is
                # withdrawn (and counted as abandoned), as the guard does for a hang-up.
                response = await asyncio.shield(task)
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed
            call.gone = True
            task.cancel()
            raise
        except TimeoutError:  # DLSERVE_REQUEST_TIMEOUT_S, sooner than the client's deadline
            task.cancel()
            raise self._late(name, call, cap) from None
        if response.status_code != 200:
            raise refusal(response)
        return bytes(response.body)

    def _late(self, model: str, call: Call, timeout_s: float) -> Refused:
        """What a call past the server's deadline is told: as HTTP's 503 (it never started
        its model run) or 504, and counted alike."""
        metrics = self.state.metrics
        if call.stage == "queued":
            metrics.errors.labels(model=model, reason="deadline").inc()
            metrics.shed.labels(model=model, reason="deadline").inc()
            return Refused(
                grpc.StatusCode.UNAVAILABLE,
                f"the request could not start within {timeout_s:g} seconds "
                "(DLSERVE_REQUEST_TIMEOUT_S): the model's queue is too long; retry shortly",
                "1",
            )
        metrics.errors.labels(model=model, reason="http_504").inc()
        return Refused(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the request was not answered within {timeout_s:g} seconds "
            "(DLSERVE_REQUEST_TIMEOUT_S)",
        )

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        body = orjson.dumps({"ready": request.ready})
        entries = await _repository(repository.index, "index", None, body)
        return pb.RepositoryIndexResponse(
            models=[{k: e[k] for k in ("name", "version", "state", "reason")} for e in entries]
        )

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        given = grpc_tensors.parameters(request.parameters)
        if isinstance(given.get("canary_percent"), str):  # no double in this message
            with contextlib.suppress(ValueError):  # else refused by the load, naming it
                given["canary_percent"] = float(given["canary_percent"])
        body = orjson.dumps({"parameters": given}, default=_bytes_as_text)
        await _repository(repository.load, "load", request.model_name, body)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _repository(repository.unload, "unload", request.model_name, b"")
        return pb.RepositoryModelUnloadResponse()


def _bytes_as_text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(type(value).__name__)


async def _repository(
    route: Callable[[Request], Awaitable[Response]], what: str, model: str | None, body: bytes
) -> Any:
    """Call a model repository route (service/repository.py) as its REST request would:
    the same checks (DLSERVE_MODEL_CONTROL), the same rollout to every worker."""
    path = repository.PREFIX + (f"models/{model}/{what}" if model is not None else what)
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [],
        "query_string": b"",
        "path_params": {"name": model} if model is not None else {},
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    response = await route(Request(scope, receive))
    if response.status_code != 200:
        raise refusal(response)
    return orjson.loads(bytes(response.body))


class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1: SERVING while the worker is ready (its /readyz), NOT_SERVING while
    its models load and once it drains. The service "" (or the inference service's name)
    is the server; a model's name is that model."""

    def __init__(self, state: WorkerState, ready: Callable[[], Awaitable[bool]]) -> None:
        self.state = state
        self.ready = ready

    async def status(self, service: str) -> Any | None:
        """The service's status, or None for a service of no such name."""
        Status = health_pb2.HealthCheckResponse
        if service in ("", SERVICE):
            up = await self.ready()
        elif service in self.state.specs:
            up = service in self.state.serving and not self.state.draining
        else:
            return None
        return Status.SERVING if up else Status.NOT_SERVING

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        status = await self.status(request.service)
        if status is None:  # the health protocol's answer for a service it does not know
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no service {request.service!r} here")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        last = None
        while True:
            status = await self.status(request.service)
            if status is None:
                status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_POLL_S)


class Malformed:
    """A request message that did not parse: refused as INVALID_ARGUMENT (grpc's own
    deserialisation error would be INTERNAL)."""

    def __init__(self, kind: str, error: Exception) -> None:
        self.message = f"the request is not a valid {kind} message ({error})"


def _parser(request_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return request_type.FromString(data)
        except DecodeError as exc:
            return Malformed(request_type.DESCRIPTOR.full_name, exc)

    return parse


class Admission:
    """What every call meets first (as the guard for HTTP): the API key, then the
    concurrency cap; a `Refused` anywhere becomes the call's status and message."""

    def __init__(self, state: WorkerState) -> None:
        settings = state.settings
        self.state = state
        self.api_key = settings.api_key.encode()
        self.open = {m for m, path in OPEN_TWINS.items() if path in settings.open_paths}
        self.max_concurrency = settings.max_concurrency
        self.in_flight = 0

    def wrap(self, method: str, handler: Handler) -> Handler:
        needs_key = bool(self.api_key) and method not in self.open
        # The probes must answer even when the worker is saturated (as HTTP's health paths).
        capped = method not in OPEN_TWINS

        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                if needs_key:
                    self.check_key(context)
                if isinstance(request, Malformed):
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                if not capped:
                    return await handler(request, context)
                self.check_concurrency(method, request)
                self.in_flight += 1
                try:
                    return await handler(request, context)
                finally:
                    self.in_flight -= 1
            except Refused as exc:
                if exc.retry_after is not None:
                    context.set_trailing_metadata((("retry-after", exc.retry_after),))
                await context.abort(exc.code, str(exc))
            except InputError as exc:  # raised before the shared request path
                await context.abort(
                    CODES.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), str(exc)
                )

        return admitted

    def check_key(self, context: grpc.aio.ServicerContext) -> None:
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        scheme, _, key = str(given).partition(" ")
        # compare_digest takes as long whatever the key's first wrong byte: no timing oracle.
        if scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key):
            return
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or wrong API key: send `authorization: Bearer <key>` metadata",
        )

    def check_concurrency(self, method: str, request: Any) -> None:
        in_hand = self.in_flight + requests_in_flight()
        if in_hand < self.max_concurrency:
            return
        if method == "ModelInfer" and request.model_name in self.state.specs:
            self.state.metrics.errors.labels(model=request.model_name, reason="http_429").inc()
        raise Refused(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"this worker already has {in_hand} requests in hand "
            f"(DLSERVE_MAX_CONCURRENCY={self.max_concurrency}); retry shortly",
            "1",
        )


def _handlers(admission: Admission, inference: Inference) -> grpc.GenericRpcHandler:
    """The inference service's methods, admitted; ModelInfer's answer is already bytes."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        serialize = (
            (lambda b: b) if method.name == "ModelInfer" else response_type.SerializeToString
        )
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            admission.wrap(method.name, getattr(inference, method.name)),
            request_deserializer=_parser(request_type),
            response_serializer=serialize,
        )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def options(settings: Settings) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.so_reuseport", 1),  # the workers share the port (grpcio's default, made sure)
        ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
        ("grpc.max_connection_age_grace_ms", int(settings.request_timeout_s * 1000)),
    ]


class GrpcServer:
    """One worker's gRPC server: started once the worker is ready, stopped on drain."""

    def __init__(self, state: WorkerState, ready: Callable[[], Awaitable[bool]]) -> None:
        self.state = state
        self.ready = ready
        self.settings = state.settings
        self.loop = asyncio.get_running_loop()  # the worker's: its batchers live there
        self.server: grpc.aio.Server | None = None
        self.stopped = False
        self._stopping: asyncio.Future[None] | None = None
        self._drained: asyncio.Task[None] | None = None
        self._starting = (
            self.loop.create_task(self._start_when_loaded()) if self.settings.grpc_port else None
        )

    async def _start_when_loaded(self) -> None:
        while not self.state.ready and self.state.load_error is None:
            await asyncio.sleep(0.05)
        if self.state.load_error is not None or self.stopped:
            return
        admission = Admission(self.state)
        server = grpc.aio.server(options=options(self.settings))
        server.add_generic_rpc_handlers((_handlers(admission, Inference(self.state, self.ready)),))
        # Open, like the HTTP probes: Kubernetes' grpc probe sends no metadata.
        health_pb2_grpc.add_HealthServicer_to_server(Health(self.state, self.ready), server)
        port = self.settings.grpc_port
        try:
            server.add_insecure_port(f"[::]:{port}")
        except RuntimeError as exc:
            log.error("gRPC: cannot listen on port %d (DLSERVE_GRPC_PORT): %s", port, exc)
            return
        await server.start()
        if self.stopped:  # the worker began to stop meanwhile
            await server.stop(None)
            return
        self.server = server
        log.info("gRPC: serving the Open Inference Protocol on port %d", port)

    def begin_drain(self, delay_s: float, timeout_s: float) -> None:
        """From the SIGTERM handler: stop accepting calls `delay_s` from now (the health
        service says NOT_SERVING meanwhile), and give those in flight until `timeout_s`."""
        grace = max(timeout_s - delay_s, 0.0)

        def stop() -> None:
            self._drained = self.loop.create_task(self.stop(grace))  # (a task needs a holder)

        self.loop.call_soon_threadsafe(self.loop.call_later, delay_s, stop)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting calls; those in flight have `grace_s` to finish. A second call
        (the worker's shutdown, after the drain began it) waits for the first."""
        self.stopped = True
        if self._stopping is None:
            server, self.server = self.server, None
            if server is None:
                return
            self._stopping = asyncio.ensure_future(server.stop(grace_s))
        await self._stopping
