"""The Open Inference Protocol's REST routes (KServe v2; Triton's and MLServer's too).

`GET /v2`, `/v2/health/{live,ready}`, `/v2/models/{name}[/versions/{version}]` (metadata),
`.../ready`, `.../config` (Triton's model configuration, which its tools read), and
`POST .../infer`. The infer route goes through the same guard, request
path (service/predict.py), adaptive batcher and metrics as the JSON routes: the guard
hands it to `infer`, which decodes the tensors (dlserve/protocol.py), checks them with the
model's own `Tensors` declaration and answers in JSON or with Triton's binary tensor
extension. The other routes are plain Starlette routes, mounted beside GET /models.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import Response

from dlserve import __version__, protocol
from dlserve.errors import InputError, NotFound, PayloadTooLarge, UnsupportedMediaType
from dlserve.prepared import Prepared
from dlserve.registry import ModelSpec
from dlserve.runners.base import Runner
from dlserve.settings import Settings
from service import predict
from service.batching import Call
from service.openapi import PREDICT_ERRORS, Operation
from service.state import WorkerState, current

INFER = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
TAG = "open inference protocol"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data"]
CONTENT_TYPES = ("", predict.JSON, "application/octet-stream")
# zlib's window bits for the two Content-Encodings tritonclient can send.
WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate request body, inflated to at most `limit` bytes."""
    if encoding in ("", "identity"):
        return body
    if encoding not in WBITS:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding} is not accepted; send "
            "gzip, deflate or an uncompressed body"
        )
    inflate = zlib.decompressobj(WBITS[encoding])
    try:
        out = inflate.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InputError(f"body: not valid {encoding} data ({exc})") from None
    if len(out) > limit or inflate.unconsumed_tail:
        raise PayloadTooLarge(
            f"request body inflates to more than the limit of {limit} bytes "
            "(DLSERVE_MAX_BODY_BYTES)"
        )
    return out


async def infer(
    state: WorkerState,
    name: str,
    version: str | None,
    headers: dict[bytes, bytes],
    body: bytes,
    call: Call | None = None,
) -> Response:
    """POST /v2/models/{name}[/versions/{version}]/infer."""
    if (refused := unserved(state, name)) is not None:
        return refused
    tensors = state.specs[name].tensors
    assert tensors is not None  # (unserved says so)
    settings = state.settings
    encoding = headers.get(b"content-encoding", b"").decode("latin-1").strip().lower()
    length = headers.get(protocol.HEADER_LENGTH.encode())

    def prepare(runner: Any) -> Prepared:
        check_version(runner, version)
        raw = decompress(body, encoding, settings.max_body_bytes)
        decoded = protocol.decode(
            raw,
            None if length is None else length.decode("latin-1"),
            tensors,
            max_body=settings.max_body_bytes,
        )
        return prepare_decoded(runner, tensors, decoded, settings)

    def respond(runner: Any, prepared: Prepared, result: Any) -> Response:
        decoded, arrays, wanted = answer_decoded(runner, tensors, prepared, result)
        content, extra = protocol.encode(
            name, runner.stored.version, decoded.request.id, arrays, wanted
        )
        media = "application/octet-stream" if extra else predict.JSON
        return Response(content, media_type=media, headers=extra)

    return await predict.serve(
        state, name, prepare, respond, heavy=len(body) > predict.HEAVY_BYTES, call=call
    )


def unserved(state: WorkerState, name: str) -> Response | None:
    """Why an infer request to `name` (REST or gRPC) cannot be served at all: no such
    model here (404), or unloaded (400, Triton's answer); None if it can."""
    spec = state.specs.get(name)
    if spec is None or spec.tensors is None:
        return _not_served(name)
    if name in state.unloaded and name not in state.serving:
        return predict.json_response({"error": unavailable_message(state, name)}, 400)
    return None


def prepare_decoded(
    runner: Any, tensors: protocol.Tensors, decoded: protocol.Decoded, settings: Settings
) -> Prepared:
    """A decoded infer request (REST or gRPC), checked by the model's own `Tensors` and made
    the runner's input; the outputs it asks for are checked now, before any model run."""
    wanted = protocol.requested_outputs(decoded, tensors)
    inner = tensors.prepare(runner, decoded.inputs, decoded.parameters, settings)
    return Prepared(inner.part, inner.items, (inner, decoded, wanted))


def answer_decoded(
    runner: Any, tensors: protocol.Tensors, prepared: Prepared, result: Any
) -> tuple[protocol.Decoded, dict[str, np.ndarray], list[tuple[str, bool]]]:
    """The request, the output arrays of its model run, and (name, as binary) of each to
    return: those asked for, which must all be given (InputError otherwise)."""
    inner, decoded, wanted = prepared.context
    arrays = tensors.answer(runner, inner, result)
    absent = [n for n, _ in wanted if n not in arrays]
    if decoded.request.outputs is not None and absent:
        raise InputError(
            f"outputs: {', '.join(absent)} cannot be given for this request "
            "(see the model's inputs: an optional one is missing)"
        )
    return decoded, arrays, [w for w in wanted if w[0] in arrays]


def check_version(runner: Any, version: str | None) -> None:
    if version is not None and version != runner.stored.version:
        raise NotFound(
            f"model {runner.name} has no version {version!r} here; it serves "
            f"version {runner.stored.version!r}"
        )


def unavailable_message(state: WorkerState, name: str) -> str:
    """Triton's words for a model that has been unloaded (tritonclient users match on
    them), then why and how to load it again."""
    return (
        f"Request for unknown model: '{name}' has no available versions "
        f"({predict.unloaded_message(state, name)})"
    )


def _not_served(name: str) -> Response:
    return predict.json_response({"error": f"model {name!r} is not served here"}, 404)


def metadata(settings: Settings) -> dict[str, Any]:
    """The server's metadata (REST and gRPC alike)."""
    # Triton's name for the load/unload/index routes (service/repository.py), when on.
    repository = ["model_repository"] if settings.model_control else []
    return {"name": "dlserve", "version": __version__, "extensions": EXTENSIONS + repository}


async def server_metadata(_: Request) -> Response:
    return predict.json_response(metadata(current().settings))


async def live(_: Request) -> Response:
    state = current()
    if state.load_error is not None:
        return predict.json_response(
            {"error": f"this worker cannot serve: {state.load_error}"}, 503
        )
    return predict.json_response({"live": True})


async def ready(_: Request) -> Response:
    state = current()
    if not state.ready or state.draining:
        return predict.json_response(
            {"error": "draining" if state.draining else "the models are still loading"},
            503,
            {"Retry-After": "1"},
        )
    return predict.json_response({"ready": True})


def _loaded(request: Request) -> tuple[Runner[Any, Any], protocol.Tensors] | Response:
    """The runner of the model the path names (and of the version it names), with the
    model's tensors; or the response that says why there is none."""
    return loaded(current(), request.path_params["name"], request.path_params.get("version"))


def loaded(
    state: WorkerState, name: str, version: str | None
) -> tuple[Runner[Any, Any], protocol.Tensors] | Response:
    """The runner of model `name` (of `version`, if named), with the model's tensors; or
    the response that says why there is none (REST and gRPC alike)."""
    spec = state.specs.get(name)
    if spec is None or spec.tensors is None:
        return _not_served(name)
    runner = state.runners.get(name)
    if runner is None and name in state.unloaded:  # Triton's answer for an unloaded model
        return predict.json_response({"error": unavailable_message(state, name)}, 400)
    if runner is None:
        return predict.json_response(
            {"error": f"model {name} is still loading"}, 503, {"Retry-After": "1"}
        )
    try:
        check_version(runner, version)
    except NotFound as exc:
        return predict.json_response({"error": str(exc)}, 404)
    return runner, spec.tensors


async def model_metadata(request: Request) -> Response:
    loaded = _loaded(request)
    if isinstance(loaded, Response):
        return loaded
    runner, tensors = loaded
    return predict.json_response(tensors.metadata(runner.name, runner.stored.version, PLATFORM))


async def model_config(request: Request) -> Response:
    loaded = _loaded(request)
    if isinstance(loaded, Response):
        return loaded
    runner, tensors = loaded
    return predict.json_response(
        tensors.config(runner.name, PLATFORM, current().settings.max_items)
    )


async def model_ready(request: Request) -> Response:
    loaded = _loaded(request)
    if isinstance(loaded, Response):
        return loaded
    return predict.json_response({"name": loaded[0].name, "ready": True})


async def infer_endpoint(request: Request) -> Response:
    """POST .../infer as a mounted route: the guard answers these itself, so this serves
    only a request that reached the app some other way, the same way."""
    return await infer(
        current(),
        request.path_params["name"],
        request.path_params.get("version"),
        {k.lower(): v for k, v in request.headers.raw},
        await request.body(),
    )


# The protocol's JSON shapes, for /docs.json (the routes build them with orjson).
class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class ModelReady(BaseModel):
    name: str
    ready: bool


class ModelConfig(BaseModel):
    """Triton's model configuration, the fields its tools read."""

    model_config = ConfigDict(extra="allow")
    name: str
    platform: str
    max_batch_size: int
    input: list[dict[str, Any]]
    output: list[dict[str, Any]]


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


NAME = {"name": "a served model's name (GET /models)"}
VERSION = {**NAME, "version": "the model store's version (the tag after the colon)"}


def _example(spec: ModelSpec) -> dict[str, Any] | None:
    return spec.tensors.example if spec.tensors and spec.tensors.example else None


def operations() -> list[Operation]:
    """Every route of the protocol, for the app to mount and /docs.json to describe."""
    ops = [
        Operation(
            "GET",
            "/v2",
            "Server metadata: name, version, extensions",
            TAG,
            ServerMetadata,
            server_metadata,
        ),
        Operation(
            "GET",
            "/v2/health/live",
            "200 while the worker can serve",
            TAG,
            Live,
            live,
            errors=(503,),
        ),
        Operation(
            "GET",
            "/v2/health/ready",
            "200 once every model is loaded; 503 while loading or draining",
            TAG,
            Ready,
            ready,
            errors=(503,),
        ),
    ]
    for base, params in (
        ("/v2/models/{name}", NAME),
        ("/v2/models/{name}/versions/{version}", VERSION),
    ):
        ops += [
            Operation(
                "GET",
                base,
                "The model's input and output tensors",
                TAG,
                ModelMetadata,
                model_metadata,
                errors=(401, 404, 503),
                path_params=params,
            ),
            Operation(
                "GET",
                base + "/ready",
                "200 once the model is loaded",
                TAG,
                ModelReady,
                model_ready,
                errors=(401, 404, 503),
                path_params=params,
            ),
            Operation(
                "GET",
                base + "/config",
                "Triton's model configuration (for its tools)",
                TAG,
                ModelConfig,
                model_config,
                errors=(401, 404, 503),
                path_params=params,
            ),
            Operation(
                "POST",
                base + "/infer",
                "Tensors in, tensors out: JSON, or Triton's "
                "binary tensor extension (Inference-Header-Content-Length)",
                TAG,
                InferResponse,
                infer_endpoint,
                request=protocol.InferRequest,
                errors=(*PREDICT_ERRORS, 404),
                path_params=params,
                example=_example,
            ),
        ]
    return ops
