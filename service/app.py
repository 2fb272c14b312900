"""The dlserve BentoML service: every configured model behind batched HTTP routes.

Run it with `dlserve serve` (or `bentoml serve service.app:DLServe`). The server refuses
to start if a model does not match its manifest (service/lifecycle.py). Each worker then
loads the models from BentoML's model store, warms them up, and only then reports ready
on /readyz. The routes are the registry's (`dlserve.registry`): each model's module
declares them with their request and response types, and this module declares each to
BentoML with exactly those types, so /docs.json, /schema.json and BentoML's own client
describe what the route really parses and returns (service/openapi.py makes the document
dlserve's own; service/pages.py serves it with the docs and demo pages). Requests are
served by service/predict.py, reached through the guard (service/guard.py). Imports no
torch.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any

import bentoml
from bentoml.validators import ContentType
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route as StarletteRoute

from dlserve import registry, store
from dlserve.registry import Route
from dlserve.runners.base import Runner
from dlserve.settings import get_settings
from service import (
    connections,
    drift,
    grpc_server,
    info,
    openapi,
    pages,
    payload_log,
    predict,
    protocol,
    repository,
    rollout,
)
from service.batching import STAGES, AdaptiveBatcher
from service.bentoml_patches import drop_bentoml_middlewares
from service.guard import RequestGuard, requests_in_flight
from service.lifecycle import (
    install_drain,
    start_trimming,
    verify_metrics_dir,
    verify_models,
)
from service.metrics import SHED_REASONS, Demand, sample_demand
from service.state import Serving, VersionCounters, WorkerState

log = logging.getLogger("dlserve.service")
# BentoML sets up its own loggers only; dlserve's INFO lines (each model's tag, precision
# and provider at start-up, the drain) would otherwise be dropped at WARNING.
logging.getLogger("dlserve").setLevel(logging.INFO)
GC_GEN0_THRESHOLD = 20_000
TRAINING_POLL_S = 1.0  # how often a worker looks for the models still training
settings = get_settings()
SERVED = registry.serving(settings)


# GET /models and each model's lookups (service/info.py), and the Open Inference
# Protocol's routes (service/protocol.py; the guard answers their POSTs itself).
OPERATIONS = info.operations(SERVED) + protocol.operations() + repository.operations()


def api_document(state: WorkerState) -> dict[str, Any]:
    """/docs.json: BentoML's OpenAPI document of this service, made dlserve's own."""
    # (@bentoml.service makes the class a bentoml Service, which the type checker cannot see)
    spec = DLServe.openapi_spec  # type: ignore[attr-defined]
    return openapi.document(
        spec.asdict(),
        served=SERVED,
        operations=OPERATIONS,
        settings=settings,
        tags={name: r.tag for name, r in state.runners.items()},
    )


# Mounted after BentoML's own routes (APIs, /livez, /readyz, /metrics), which it never
# shadows, and before BentoML's docs page and /docs.json, which the pages replace
# (service/pages.py; tests/test_pages.py fails if a BentoML upgrade changes that order).
extra_routes = Starlette(
    routes=[
        *(StarletteRoute(op.path, op.endpoint, methods=[op.method]) for op in OPERATIONS),
        *pages.routes(settings, api_document),
    ]
)


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


def bentoml_api(model: str, route: Route) -> bentoml.api:
    """BentoML's declaration of a registry route: its path, its request type (or, for a
    file route, a raw body of its first content type) and its response type. The method
    answers through service/predict.py, like the guard's path."""
    if route.request is None:

        async def take_file(self: DLServe, body: bytes, /) -> Response:
            return await predict.answer(self.state, model, route, body)

        # Set here, not written above: BentoML reads the annotation at import time, and
        # the content type comes from the route.
        take_file.__annotations__ = {
            "body": Annotated[bytes, ContentType(route.content_types[0])],
            "return": Response,
        }
        method: Callable[..., Any] = take_file
        spec: dict[str, Any] = {}
    else:

        async def take_json(self: DLServe, **fields: Any) -> Response:
            assert route.request is not None
            request = route.request.model_construct(**fields)  # BentoML has validated it
            return await predict.answer_parsed(self.state, model, route, request)

        method, spec = take_json, {"input_spec": route.request}
    method.__name__ = method.__qualname__ = route.name
    method.__doc__ = route.summary
    return bentoml.api(route=route.path, output_spec=route.response, **spec)(method)


def declare_models(cls: type) -> type:
    """Declare each configured model the way BentoML expects: its routes, and a BentoModel
    class attribute so that `bentoml build` packages the model into the Bento: the latest
    version of DLSERVE_PRECISION (BentoML's own `latest` ignores precision)."""
    for name, spec in SERVED.items():
        tag = store.latest(name, settings.precision)
        # (BentoML refuses to serve a BentoModel that is not in the store: one still being
        # trained by `dlserve serve` is declared by its routes only)
        if tag is not None or name not in settings.still_training:
            setattr(cls, f"{name}_model", bentoml.models.BentoModel(tag or f"{name}:latest"))
        for route in spec.routes:
            setattr(cls, route.name, bentoml_api(name, route))
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
    # up; that cost 40 % of digits throughput here, so routes are traced only when asked
    # (and the middleware itself is dropped then: service/bentoml_patches.py).
    tracing={"excluded_urls": "" if settings.tracing else ".*"},
)
@declare_models
class DLServe:
    def __init__(self) -> None:
        # All the request path sees of this worker (service/state.py): handed to it, so
        # that it never reaches back into this class.
        self.state = WorkerState(settings, SERVED)
        metrics = self.state.metrics
        metrics.worker_starts.labels(worker=str(bentoml.server_context.worker_index)).inc()
        for name in SERVED:
            metrics.model_ready.labels(model=name).set(0)
            # Series that exist from the start at 0: rate() and increase() miss a counter's
            # first event when the series appears with it, and these are rare by design.
            for stage in STAGES:
                metrics.abandoned.labels(model=name, stage=stage)
            for reason in SHED_REASONS:
                metrics.shed.labels(model=name, reason=reason)
        install_drain(self.begin_drain, settings.drain_delay_s, settings.drain_timeout_s)
        # The Open Inference Protocol over gRPC on this worker's event loop, once its
        # models are loaded (DLSERVE_GRPC_PORT; service/grpc_server.py).
        self.grpc = grpc_server.GrpcServer(self.state, self.__is_ready__)
        # What each model answers and how far that drifts from its training data, counted
        # per model run and published once a second (service/drift.py).
        self.mix = drift.Mix(metrics)
        self.mix.start()
        # Loading off the event loop lets /livez answer while models load (/readyz: 503).
        threading.Thread(target=self._load_models, name="dlserve-load", daemon=True).start()

    def _load_models(self) -> None:
        directory = rollout.run_dir() if settings.model_control else None
        desired = rollout.read_desired(directory) if directory else rollout.Desired()
        try:
            for name in SERVED:
                if name in settings.still_training and not store.exists(name, settings.precision):
                    self.state.training.add(name)
                    self.state.unloaded[name] = "it is still being trained by `dlserve serve`"
                    continue
                self._load(name, desired.models.get(name))
        except Exception as exc:  # noqa: BLE001 - whatever it was, this worker cannot serve
            self.state.load_error = f"{type(exc).__name__}: {exc}"
            log.exception(
                "could not load the models: this worker stays not ready and "
                "reports not alive on /livez"
            )
            return
        tune_gc()
        start_trimming(settings.malloc_trim_s)
        self.state.ready = True
        threading.Thread(target=self._watch_for_hangs, name="dlserve-watchdog", daemon=True).start()
        sample_demand(self.state.metrics, list(SERVED), self._demand)
        if directory is not None:
            worker = str(bentoml.server_context.worker_index)
            rollout.Follower(directory, worker, self._apply, self._serving_tags).start()
        if self.state.training:
            threading.Thread(
                target=self._add_when_trained, name="dlserve-join", daemon=True
            ).start()

    def _load(self, name: str, wish: rollout.Wish | None) -> None:
        """Open, warm up and serve `name`: the latest version of DLSERVE_PRECISION, unless a
        rollout named another (a worker that replaces one that died serves what the others
        serve). The latest version's manifest is the contract every later version must keep
        (rollout.py)."""
        latest = store.load(name, settings.precision)
        self.state.contracts[name] = latest.manifest
        if wish is not None and wish.tag is None:
            self.state.unloaded[name] = wish.reason
            return
        stored = store.load(wish.tag) if wish is not None and wish.tag else latest
        runner = SERVED[name].runner.open(stored, settings)
        runner.warm_up()
        self._serve(name, runner)

    def _add_when_trained(self) -> None:
        """Serve each model `dlserve serve` is still training as soon as its export is in the
        model store (it looks every TRAINING_POLL_S: a store listing took 3.5 ms here)."""
        while self.state.training and not self.state.draining:
            time.sleep(TRAINING_POLL_S)
            for name in sorted(self.state.training):
                if not store.exists(name, settings.precision):
                    continue
                try:
                    self._load(name, None)
                except Exception as exc:  # noqa: BLE001 - the others keep serving
                    self.state.unloaded[name] = f"its new export cannot be served: {exc}"
                    log.exception("%s: its new export cannot be served", name)
                else:
                    log.info(
                        "%s: trained and exported; now serving %s",
                        name,
                        self.state.serving[name].tag,
                    )
                self.state.training.discard(name)

    def _serve(self, name: str, serving: Serving | Runner[Any, Any]) -> None:
        """Make `serving` (or a runner, with a batcher of its own) what this worker serves of
        `name`: one assignment, so that a request sees the old or the new, never a mix
        (service/state.py, Serving)."""
        if not isinstance(serving, Serving):
            serving = Serving(serving, self._batcher(serving))
        self.state.serving[name] = serving
        self.state.unloaded.pop(name, None)
        for runner in (serving.runner, *([serving.canary.runner] if serving.canary else [])):
            self._info(runner).set(1)
        self.state.metrics.model_ready.labels(model=name).set(1)

    def _info(self, runner: Runner[Any, Any]) -> Any:
        return self.state.metrics.model_info.labels(
            model=runner.name,
            version=runner.stored.version,
            sha256=runner.manifest.onnx_sha256,
            provider=runner.provider,
            precision=runner.manifest.precision,
        )

    def _open(self, name: str, tag: str) -> Serving:
        """Version `tag`, ready to serve: the one a load request in this worker has opened
        and checked already, or opened and checked now (rollout.Refused if it cannot)."""
        runner = self.state.candidates.pop(tag, None) or rollout.open_checked(
            SERVED[name], tag, settings, self.state.contracts[name]
        )
        return Serving(runner, self._batcher(runner))

    def _apply(self, name: str, wish: rollout.Wish) -> str | None:
        """Serve what a rollout wishes for `name` (service/rollout.py, Follower): None, or
        why this worker cannot. The version before keeps serving until the new one has been
        opened, checked and warmed up, and finishes what it has queued."""
        current = self.state.serving.get(name)
        if wish.tag is None:
            if current is not None:
                self.state.unloaded[name] = wish.reason
                self.state.serving.pop(name, None)
                self.state.metrics.model_ready.labels(model=name).set(0)
                self._retire(current)
            return None
        # Reuse what serves already: the stable version, or the canary being promoted.
        known = {s.tag: s for s in (current, current.canary if current else None) if s}
        try:
            stable = known.get(wish.tag) or self._open(name, wish.tag)
            canary = None
            if wish.canary is not None:
                canary = known.get(wish.canary) or self._open(name, wish.canary)
        except rollout.Refused as exc:
            return str(exc)
        stable = Serving(stable.runner, stable.batcher)  # without the canary it had
        if canary is not None:

            def counters(tag: str) -> VersionCounters:
                return VersionCounters.of(self.state.metrics, name, tag.partition(":")[2])

            stable = Serving(
                stable.runner,
                stable.batcher,
                Serving(canary.runner, canary.batcher, counted=counters(canary.tag)),
                wish.canary_percent,
                counters(stable.tag),
            )
        self._serve(name, stable)
        kept = {stable.tag, *([canary.tag] if canary else [])}
        for old in known.values():
            if old.tag not in kept:
                self._retire(old)
        log.info(
            "%s: now serving %s%s",
            name,
            wish.tag,
            f" with {wish.canary} on {wish.canary_percent:g} % of requests" if canary else "",
        )
        return None

    def _retire(self, old: Serving) -> None:
        """Close a replaced version's batcher once it has answered what it had queued."""
        self._info(old.runner).set(0)

        def close_when_idle() -> None:
            deadline = time.monotonic() + settings.request_timeout_s + settings.hang_timeout_s
            while not old.batcher.idle and time.monotonic() < deadline:
                time.sleep(0.05)
            old.batcher.close()

        threading.Thread(target=close_when_idle, name="dlserve-retire", daemon=True).start()

    def _serving_tags(self) -> tuple[dict[str, str | None], dict[str, str | None]]:
        """What this worker serves of each model, and the canary beside it."""
        serving = {name: self.state.serving.get(name) for name in SERVED}
        return (
            {name: s.tag if s else None for name, s in serving.items()},
            {name: s.canary.tag if s and s.canary else None for name, s in serving.items()},
        )

    def _watch_for_hangs(self) -> None:
        """Exit the worker when a model run hangs (DLSERVE_HANG_TIMEOUT_S): its requests
        have had their 504s, and no later request could be served by it. The process
        manager replaces it; a worker is cheaper to start than to unstick."""
        while True:
            time.sleep(1)
            for name, batcher in self.state.batchers.items():
                if (stuck := batcher.stuck_for()) > settings.hang_timeout_s:
                    self.state.load_error = f"{name}: a model run has taken {stuck:.0f} s"
                    log.error(
                        "%s: a model run has taken %.0f s (DLSERVE_HANG_TIMEOUT_S=%g); "
                        "exiting so that a new worker replaces this one",
                        name,
                        stuck,
                        settings.hang_timeout_s,
                    )
                    logging.shutdown()
                    os._exit(70)  # EX_SOFTWARE

    def _demand(self) -> Demand:
        """Requests in hand and items queued now, for the autoscaler (service/metrics.py).
        list() copies the models served in one step, so a rollout changing them meanwhile
        cannot break the iteration."""
        serving = list(self.state.serving.items())
        return Demand(requests_in_flight(), {n: s.batcher.queued_items for n, s in serving})

    def begin_drain(self) -> None:
        self.state.draining = True
        self.grpc.begin_drain(settings.drain_delay_s, settings.drain_timeout_s)

    @bentoml.on_shutdown  # type: ignore[untyped-decorator]
    async def stop_grpc(self) -> None:
        """Stop the gRPC server (or wait for the drain's stop) before the loop goes."""
        await self.grpc.stop(settings.drain_timeout_s - settings.drain_delay_s)

    @bentoml.on_shutdown  # type: ignore[untyped-decorator]
    def close(self) -> None:
        """Stop each batcher's inference thread, and the preparing thread, with the worker."""
        for batcher in self.state.batchers.values():
            batcher.close()
        self.state.preparing.shutdown(wait=False, cancel_futures=True)
        if self.state.payload_log is not None:  # what is queued, written out before exit
            self.state.payload_log.close()

    def _batcher(self, runner: Runner[Any, Any]) -> AdaptiveBatcher:
        metrics = self.state.metrics
        self.mix.watch(runner)
        inference = metrics.inference_seconds.labels(model=runner.name, provider=runner.provider)
        batch_items = metrics.batch_items.labels(model=runner.name)
        items_predicted = metrics.items_predicted.labels(model=runner.name)

        def on_batch(items: int, seconds: float) -> None:
            inference.observe(seconds)
            batch_items.observe(items)
            items_predicted.inc(items)

        return AdaptiveBatcher(
            runner.name,
            runner.run_batch,
            max_batch_size=settings.max_batch_size,
            combine=settings.batching,
            max_queue_items=settings.max_queue_items,
            max_wait_s=settings.batch_wait_ms / 1000.0,
            join=runner.join,
            cost=runner.item_costs,
            max_run_cost=runner.run_budget,
            on_batch=on_batch,
            on_wait=metrics.queue_seconds.labels(model=runner.name).observe,
        )

    async def __is_ready__(self) -> bool:
        """Every configured model served (or, with DLSERVE_READY_WHEN=any, at least one: the
        others are still training), and not draining."""
        complete = not self.state.training or settings.ready_when == "any"
        return self.state.ready and complete and not self.state.draining

    async def __is_alive__(self) -> bool:
        return self.state.load_error is None


# Refuse a server whose models do not match their manifests before any worker starts.
verify_models(SERVED, settings)
if settings.model_control and bentoml.server_context.worker_index is None:
    # `bentoml serve`'s own process, before its workers start: their shared run
    # directory, through which a rollout reaches every worker (service/rollout.py).
    rollout.prepare_run_dir()
    atexit.register(rollout.remove_run_dir)
verify_metrics_dir()
payload_log.check_target(settings)
drop_bentoml_middlewares(tracing=settings.tracing)
connections.install()
# Refuses what it must before anything reads the body, and hands predict requests to
# service/predict.py; edits responses on their way out.
GUARDED = {route.path: (name, route) for name, spec in SERVED.items() for route in spec.routes}
DLServe.add_asgi_middleware(RequestGuard, routes=GUARDED)  # type: ignore[attr-defined]
