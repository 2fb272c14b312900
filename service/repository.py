"""The Open Inference Protocol's model repository extension, as Triton serves it, so that
tritonclient's `get_model_repository_index`, `load_model` and `unload_model` work as they
are:

- `POST /v2/repository/index`: every version of every served model in the store, with
  its state here (READY, LOADING, UNAVAILABLE) and why; `{"ready": true}` lists only
  what is READY. Beyond Triton's fields: each version's precision, creation time and
  held-out metrics, and which one was served before (for a rollback);
- `POST /v2/repository/models/{name}/load`: serve the newest version of DLSERVE_PRECISION,
  or the one named by `{"parameters": {"version": "abc123"}}` (or the whole tag,
  `digits:abc123`, whatever its precision), or with `{"parameters": {"rollback": true}}`
  the version served before the current one. The call returns once every worker serves
  it, or fails naming the worker and why, and then the version before still serves
  everywhere. A version that cannot serve is refused before any worker switches: 404 not
  in the store, 422 with the reason (checksum, ONNX Runtime cannot load it, another
  contract, a smoke run that fails or answers NaN);
- `POST /v2/repository/models/{name}/unload`: no version of it is served; its requests
  are answered 503 (400 on the protocol's infer route, as Triton does) until a load.

These change what every client is answered by, so they are off unless
DLSERVE_MODEL_CONTROL=true (403 otherwise), and need the API key when one is set
(SECURITY.md). How every worker learns of a change: service/rollout.py.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, RootModel
from starlette.requests import Request
from starlette.responses import Response

from dlserve import store
from service import predict, rollout
from service.openapi import Operation
from service.state import Serving, WorkerState, current

PREFIX = "/v2/repository/"
TAG = "Model repository (admin)"
WAIT_POLL_S = 0.05


class RepositoryEntry(BaseModel):
    name: str
    version: str
    state: str  # READY, LOADING or UNAVAILABLE
    reason: str
    precision: str
    created_at: str
    metrics: dict[str, Any]
    previous: bool  # the version served before the current one: what a rollback loads


class RepositoryIndex(RootModel[list[RepositoryEntry]]):
    pass


class IndexRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"ready": True}})
    ready: bool = False  # only the versions that are READY


class LoadParameters(BaseModel):
    version: str | None = None  # "abc123" or "digits:abc123"; none: the newest
    # With a version: it answers this share of requests, beside the one that serves now;
    # loading it again without this promotes it, `rollback` drops it.
    canary_percent: float | None = None
    rollback: bool = False  # the version served before the current one, or drop the canary


class LoadRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"parameters": {"rollback": True}}})
    parameters: LoadParameters = LoadParameters()


class Unloaded(BaseModel):
    model: str
    unloaded: str | None  # the tag that was served (None: none was)


class Loaded(BaseModel):
    model: str
    version: str  # the tag every worker now serves
    previous: str | None  # the tag it replaced (None: none was served)
    workers: int
    canary: str | None = None  # the candidate beside it, on canary_percent % of requests
    canary_percent: float = 0.0


def _refusal(status: int, message: str) -> Response:
    return predict.json_response({"error": message}, status)


def _parameters(body: bytes) -> dict[str, Any]:
    """The request's `parameters` object (an empty body is no parameters)."""
    if not body.strip():
        return {}
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise rollout.Refused(400, f"the request body is not JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("parameters", {}), dict):
        raise rollout.Refused(400, 'expected a JSON object, e.g. {"parameters": {"version": "…"}}')
    parameters: dict[str, Any] = raw.get("parameters", {})
    return parameters


def _controlled(request: Request) -> tuple[WorkerState, str] | Response:
    """This worker's state and the model the path names, or why the call is refused."""
    state = current()
    if not state.settings.model_control:
        return _refusal(
            403,
            "model control is off on this server: start it with DLSERVE_MODEL_CONTROL=true "
            "to load and unload models",
        )
    name = request.path_params["name"]
    if name not in state.specs:
        return _refusal(404, f"model {name!r} is not served here; served: {', '.join(state.specs)}")
    if not state.ready:
        return _refusal(503, predict.LOADING)
    return state, name


async def index(request: Request) -> Response:
    """POST /v2/repository/index."""
    state = current()
    if not state.settings.model_control:
        return _refusal(403, "model control is off on this server (DLSERVE_MODEL_CONTROL)")
    try:
        ready_only = bool((orjson.loads(await request.body() or b"{}") or {}).get("ready"))
    except (orjson.JSONDecodeError, AttributeError):
        return _refusal(400, 'expected an empty body or a JSON object such as {"ready": true}')
    directory = rollout.run_dir()
    desired = rollout.read_desired(directory) if directory else rollout.Desired()
    entries = []
    for name in state.specs:
        serving = state.serving.get(name)
        wish = desired.models.get(name)
        for v in await asyncio.to_thread(store.versions, name):
            entry = _entry(name, v, serving, wish, state)
            if entry.state == "READY" or not ready_only:
                entries.append(entry.model_dump())
    return predict.json_response(entries)


def _entry(
    name: str,
    v: store.Version,
    current: Serving | None,
    wish: rollout.Wish | None,
    state: WorkerState,
) -> RepositoryEntry:
    serving = current.tag if current else None
    if v.tag == serving:
        status, reason = "READY", ""
    elif current is not None and current.canary is not None and current.canary.tag == v.tag:
        status, reason = "READY", f"canary: {current.canary_percent:g} % of requests"
    elif wish is not None and v.tag in (wish.tag, wish.canary):
        status, reason = "LOADING", "being loaded"
    elif serving is None and name in state.unloaded:
        status, reason = "UNAVAILABLE", state.unloaded[name]
    else:
        status, reason = "UNAVAILABLE", f"not loaded ({serving or 'none'} is served)"
    return RepositoryEntry(
        name=name,
        version=v.version,
        state=status,
        reason=reason,
        precision=v.precision,
        created_at=v.created_at,
        metrics=v.metrics,
        previous=wish is not None and wish.previous == v.tag,
    )


async def load(request: Request) -> Response:
    """POST /v2/repository/models/{name}/load."""
    controlled = _controlled(request)
    if isinstance(controlled, Response):
        return controlled
    state, name = controlled
    directory = rollout.run_dir()
    assert directory is not None  # made at start-up when model control is on
    before = state.serving.get(name)
    served = {s.tag for s in (before, before.canary if before else None) if s}
    prior = rollout.read_desired(directory).models.get(name)  # what a failure puts back
    opened: list[str] = []
    try:
        wish = _plan(state, name, _parameters(await request.body()), prior, before)
        for tag in {wish.tag, wish.canary} - served - {None}:
            assert tag is not None
            # Checked here first, before any worker switches; this worker's rollout
            # thread then takes the opened version from `candidates`.
            state.candidates[tag] = await asyncio.to_thread(
                rollout.open_checked, state.specs[name], tag, state.settings, state.contracts[name]
            )
            opened.append(tag)
    except rollout.Refused as exc:
        for tag in opened:  # a canary refused after its stable version was opened
            state.candidates.pop(tag, None)
        return _refusal(exc.status, str(exc))
    generation = rollout.change(directory, name, lambda _: wish)
    failure = await _wait_for_workers(state, directory, generation, name, wish.tag, wish.canary)
    if failure is not None:
        for tag in (wish.tag, wish.canary):
            state.candidates.pop(tag or "", None)
        # Put back what served before, everywhere, then say why.
        back = prior or rollout.Wish(before.tag if before else None)
        again = rollout.change(directory, name, lambda _: back)
        await _wait_for_workers(state, directory, again, name, back.tag, back.canary)
        return _refusal(
            503,
            f"{wish.tag} was not rolled out ({failure}); {before.tag if before else 'nothing'} "
            "still serves",
        )
    return predict.json_response(
        Loaded(
            model=name,
            version=wish.tag or "",
            previous=before.tag if before else None,
            workers=state.settings.workers,
            canary=wish.canary,
            canary_percent=wish.canary_percent,
        ).model_dump()
    )


def _plan(
    state: WorkerState,
    name: str,
    parameters: dict[str, Any],
    prior: rollout.Wish | None,
    before: Serving | None,
) -> rollout.Wish:
    """What every worker should serve after this load: the version it names (or the newest
    of DLSERVE_PRECISION), as a canary beside the current one, or the one before."""
    unknown = sorted(set(parameters) - {"version", "rollback", "canary_percent"})
    if unknown:
        raise rollout.Refused(
            400,
            f"unsupported load parameter(s) {unknown}: dlserve loads versions from its model "
            "store (`version`, `canary_percent`, `rollback`), not configurations or files",
        )
    before_tag = before.tag if before else None
    previous = prior.previous if prior else None
    if parameters.get("rollback"):
        if prior is not None and prior.canary is not None:  # drop the canary
            return rollout.Wish(prior.tag, previous=previous)
        if previous is None:
            raise rollout.Refused(409, f"{name} has no earlier version to roll back to")
        return rollout.Wish(previous, previous=before_tag)
    tag = _named(state, name, parameters.get("version"))
    percent = parameters.get("canary_percent")
    if percent is None:
        return rollout.Wish(tag, previous=before_tag if before_tag != tag else previous)
    if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 < percent < 100:
        raise rollout.Refused(
            400, f"parameters.canary_percent must be a number between 0 and 100, got {percent!r}"
        )
    if before_tag is None or tag == before_tag:
        raise rollout.Refused(
            409,
            f"a canary needs another version serving beside it; {name} serves "
            f"{before_tag or 'nothing'}",
        )
    return rollout.Wish(before_tag, previous=previous, canary=tag, canary_percent=float(percent))


def _named(state: WorkerState, name: str, version: Any) -> str:
    """The tag a load names, or the newest of DLSERVE_PRECISION."""
    if version is not None:
        if not isinstance(version, str):
            raise rollout.Refused(400, f"parameters.version must be a string, got {version!r}")
        return rollout.resolve_tag(name, version)
    latest = store.latest(name, state.settings.precision)
    if latest is None:
        raise rollout.Refused(404, f"{name} has no {state.settings.precision} version in the store")
    return latest


async def unload(request: Request) -> Response:
    """POST /v2/repository/models/{name}/unload."""
    controlled = _controlled(request)
    if isinstance(controlled, Response):
        return controlled
    state, name = controlled
    directory = rollout.run_dir()
    assert directory is not None
    before = state.serving.get(name)
    before_tag = before.tag if before else None
    when = datetime.now(UTC).isoformat(timespec="seconds")
    generation = rollout.change(
        directory,
        name,
        lambda old: rollout.Wish(
            None,
            previous=before_tag or (old.previous if old else None),
            reason=f"unloaded by POST {PREFIX}models/{name}/unload at {when}",
        ),
    )
    failure = await _wait_for_workers(state, directory, generation, name, None)
    if failure is not None:
        return _refusal(503, f"{name} was not unloaded everywhere: {failure}")
    return predict.json_response(Unloaded(model=name, unloaded=before_tag).model_dump())


async def _wait_for_workers(
    state: WorkerState,
    directory: Any,
    generation: int,
    name: str,
    tag: str | None,
    canary: str | None = None,
) -> str | None:
    """None once every worker has applied `generation` and serves `tag` for `name`;
    otherwise which worker did not, and why."""
    workers = [str(i) for i in range(1, state.settings.workers + 1)]
    deadline = time.monotonic() + state.settings.rollout_timeout_s
    while True:
        reports = rollout.read_reports(directory)
        pending = []
        for worker in workers:
            report = reports.get(worker)
            if report is None or report.generation < generation:
                pending.append(worker)
            elif name in report.errors:
                return f"worker {worker}: {report.errors[name]}"
            elif report.serving.get(name) != tag or report.canaries.get(name) != canary:
                return f"worker {worker} serves {report.serving.get(name)} (a later change?)"
        if not pending:
            return None
        if time.monotonic() > deadline:
            return (
                f"worker(s) {', '.join(pending)} did not switch within "
                f"{state.settings.rollout_timeout_s:g} s (DLSERVE_ROLLOUT_TIMEOUT_S)"
            )
        await asyncio.sleep(WAIT_POLL_S)


def operations() -> list[Operation]:
    """The three routes, for the router and the OpenAPI document (service/openapi.py)."""
    name = {"name": "a served model"}
    return [
        Operation(
            "POST",
            PREFIX + "index",
            "Every version of every served model in the store, with its state here",
            TAG,
            RepositoryIndex,
            index,
            request=IndexRequest,
            errors=(400, 401, 403),
        ),
        Operation(
            "POST",
            PREFIX + "models/{name}/load",
            "Serve a version (the newest, a named one, or the one before) in every worker",
            TAG,
            Loaded,
            load,
            request=LoadRequest,
            errors=(400, 401, 403, 404, 409, 422, 503),
            path_params=name,
            example=lambda _: {"parameters": {"rollback": True}},
        ),
        Operation(
            "POST",
            PREFIX + "models/{name}/unload",
            "Stop serving the model, in every worker, until a load",
            TAG,
            Unloaded,
            unload,
            errors=(401, 403, 404, 503),
            path_params=name,
        ),
    ]
