"""The service's GET routes beside BentoML's: GET /models, and each model's lookups (its
registry entry's `lookups`, such as GET /recommender/movies).

They are served by the app service/app.py mounts beside BentoML's routes, and each is an
`Operation` with its response type, so /docs.json describes it exactly
(service/openapi.py). The guard checks the API key and the concurrency cap first, as for
every route.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import Response

from dlserve.errors import InputError
from dlserve.registry import Lookup, ModelSpec
from service import predict
from service.openapi import SERVICE_TAG, Operation
from service.state import current

# A lookup answers from the model's own data, which changes only with the model version;
# a browser may reuse an answer for this long (`private`: it can depend on the API key).
LOOKUP_MAX_AGE_S = 300


class Tensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    dtype: str
    shape: list[int | str]


class ModelInfo(BaseModel):
    """One loaded model, as `Runner.describe` gives it."""

    model_config = ConfigDict(extra="forbid")
    name: str
    tag: str
    sha256: str
    provider: str
    task: str
    architecture: str
    onnx_sha256: str
    opset: int
    precision: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    metrics: dict[str, Any]
    preprocessing: dict[str, Any]
    created_at: str


class TrainingModel(BaseModel):
    """A model `dlserve serve` is still training beside the server: how far it has got."""

    model_config = ConfigDict(extra="forbid")
    name: str
    message: str


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    training: list[TrainingModel] = []


async def list_models(_: Request) -> Response:
    state = current()
    # /readyz may have been answered by another worker: an empty list from one still
    # loading would read as "nothing is served" (seen in CI).
    if (refusal := await predict.unless_loaded(state)) is not None:
        return refusal
    answer = ModelsResponse(
        models=[ModelInfo.model_validate(r.describe()) for r in state.runners.values()],
        training=[
            TrainingModel(name=name, message=predict.training_message(state, name))
            for name in sorted(state.training)
        ],
    )
    return Response(answer.model_dump_json(), media_type=predict.JSON)


def lookup_endpoint(model: str, lookup: Lookup) -> Any:
    """The endpoint of one of `model`'s lookups: parse the query, answer from the runner."""

    async def endpoint(request: Request) -> Response:
        state = current()
        if (refusal := await predict.unless_loaded(state, model)) is not None:
            return refusal
        try:
            query = lookup.parse(request.query_params)
        except InputError as exc:
            return predict.error(state, model, exc.status, str(exc), f"http_{exc.status}")
        serving = state.serving.get(model)
        if serving is None:
            return predict.error(
                state, model, 503, predict.unloaded_message(state, model), "unloaded"
            )
        answer = lookup.answer(serving.runner, query)
        return Response(
            answer.model_dump_json(),
            media_type=predict.JSON,
            headers={"Cache-Control": f"private, max-age={LOOKUP_MAX_AGE_S}"},
        )

    return endpoint


def operations(served: dict[str, ModelSpec]) -> list[Operation]:
    """GET /models and every served model's lookups."""
    ops = [
        Operation(
            "GET",
            "/models",
            "Every loaded model: tag, SHA-256, execution "
            "provider, input and output tensors, preprocessing, training metrics",
            SERVICE_TAG,
            ModelsResponse,
            list_models,
        )
    ]
    for name, spec in served.items():
        ops += [
            Operation(
                "GET",
                lookup.path,
                lookup.summary,
                name,
                lookup.response,
                lookup_endpoint(name, lookup),
                query=lookup.query,
                errors=(400, 401, 429, 503, 504),
            )
            for lookup in spec.lookups
        ]
    return ops
