"""dlserve's OpenAPI document (/docs.json): BentoML's, made to describe dlserve.

BentoML generates the document from the routes declared to it, with the exact request
and response types of each registry route (service/app.py). It knows nothing else about
dlserve: its title, version and description are BentoML's boilerplate, the errors it
lists are its own (dlserve answers `{"error": ...}` instead), and routes served by a
mounted app (GET /models, each model's lookups) are missing. `document` takes BentoML's
document and writes in what dlserve really is: its version and each model's tag, the
models, the limits in force, the API key, the errors each route can answer, and every
`Operation` the service serves besides BentoML's (anything a future route declares as an
Operation is documented with no change here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel

from dlserve import __version__
from dlserve.registry import ModelSpec
from dlserve.settings import Settings

REF = "#/components/schemas/{model}"
LICENCE = {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"}
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "string",
            "description": "what was refused and why, naming the field or the setting",
        }
    },
    "example": {
        "error": "texts[0]: the text is empty or only whitespace; there is nothing to classify"
    },
}
# Every refusal dlserve sends (service/guard.py, service/predict.py, dlserve/errors.py).
ERRORS = {
    400: "The input is malformed: the message names the field and what was expected.",
    401: "Missing or wrong API key (only when the server has one: DLSERVE_API_KEY).",
    413: "Too much: the body, the items, a text, an image or the ratings are over a limit "
    "(the message names the setting).",
    404: "No such model here, or not that version of it.",
    403: "Model control is off on this server (DLSERVE_MODEL_CONTROL).",
    409: "The model has no earlier version to roll back to.",
    415: "A body type the route does not take, or any pickle.",
    422: "The version cannot serve: its checksum, ONNX Runtime, its contract or its smoke "
    "run (the message says which); the version before keeps serving.",
    429: "This worker has DLSERVE_MAX_CONCURRENCY requests in hand; retry after "
    "`Retry-After` seconds.",
    503: "The models are still loading, or the model's queue is full; retry after "
    "`Retry-After` seconds.",
    504: "Not answered within DLSERVE_REQUEST_TIMEOUT_S.",
}
PREDICT_ERRORS = (400, 401, 413, 415, 429, 503, 504)
HEALTH_TAG = "health and metrics"
SERVICE_TAG = "service"
# BentoML's own components that no dlserve route answers with.
BENTOML_ONLY = ("InvalidArgument", "NotFound", "InternalServerError", "TaskStatusResponse")
HEALTH = {
    "/livez": "200 while the worker runs and its models have not failed to load.",
    "/healthz": "The same as /livez (the older Kubernetes name).",
    "/readyz": "200 once every model is loaded and warmed up; 503 before, and again from "
    "the moment a SIGTERM starts the drain.",
    "/metrics": "Prometheus metrics, correct across worker processes: BentoML's "
    "`bentoml_service_*` and dlserve's `dlserve_*` (docs/metrics.md).",
}


@dataclass(frozen=True)
class Operation:
    """A route BentoML does not declare (a mounted app or the guard serves it), described
    from its pydantic types; `endpoint` is the Starlette endpoint that serves it."""

    method: str
    path: str
    summary: str
    tag: str
    response: type[BaseModel]
    endpoint: Callable[..., Any]
    query: type[BaseModel] | None = None
    request: type[BaseModel] | None = None
    errors: tuple[int, ...] = (401, 429, 504)
    path_params: dict[str, str] = field(default_factory=dict)  # name → description
    # For a route of every model (`{name}` in its path): each served model's request
    # example, shown by name in the docs page's example list; None where it has none.
    example: Callable[[ModelSpec], dict[str, Any] | None] | None = None


def document(
    base: dict[str, Any],
    *,
    served: dict[str, ModelSpec],
    operations: Iterable[Operation],
    settings: Settings,
    tags: dict[str, str],
) -> dict[str, Any]:
    """BentoML's document `base`, rewritten to describe dlserve; `tags` are the loaded
    models' tags by name (empty while they load)."""
    # (a round trip through JSON makes the status codes strings)
    doc: dict[str, Any] = orjson.loads(orjson.dumps(base, option=orjson.OPT_NON_STR_KEYS))
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in BENTOML_ONLY:
        schemas.pop(name, None)
    schemas["Error"] = ERROR_SCHEMA
    doc["info"] = info(served, settings, tags)
    doc["tags"] = [
        {"name": SERVICE_TAG, "description": "what this server serves"},
        *({"name": name, "description": spec.summary} for name, spec in served.items()),
        {"name": HEALTH_TAG, "description": "probes and Prometheus metrics"},
    ]
    paths = doc.setdefault("paths", {})
    for name, spec in served.items():
        for route in spec.routes:
            post = paths[route.path]["post"]
            post.update(
                tags=[name],
                summary=route.summary,
                responses={"200": post["responses"]["200"], **errors(PREDICT_ERRORS)},
            )
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = operation(op, schemas, served)
    for path, description in HEALTH.items():
        if path in paths:
            paths[path]["get"].update(tags=[HEALTH_TAG], description=description)
    if settings.api_key:
        doc["components"]["securitySchemes"] = {
            "apiKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "the server's key (DLSERVE_API_KEY), as `Authorization: Bearer`",
            }
        }
        doc["security"] = [{"apiKey": []}]
        for path in settings.open_paths:
            for method in paths.get(path, {}).values():
                method["security"] = []
    return doc


def info(served: dict[str, ModelSpec], settings: Settings, tags: dict[str, str]) -> dict[str, Any]:
    """Title, version (the package's and each model's tag), description, contact, licence."""
    loaded = ", ".join(tags[name] for name in served if name in tags) or "models loading"
    return {
        "title": "dlserve",
        "version": f"{__version__} ({loaded})",
        "description": description(served, settings, tags),
        "contact": {"name": "dlserve maintainers"},
        "license": LICENCE,
        "x-dlserve-models": {name: tags.get(name) for name in served},
    }


def route_paths(spec: ModelSpec) -> list[str]:
    """A model's predict routes, then its lookups."""
    return [r.path for r in spec.routes] + [lookup.path for lookup in spec.lookups]


def description(served: dict[str, ModelSpec], settings: Settings, tags: dict[str, str]) -> str:
    models = "\n".join(
        f"| `{name}` | {spec.summary} | `{tags.get(name, 'loading')}` | "
        f"{', '.join(f'`{path}`' for path in route_paths(spec))} |"
        for name, spec in served.items()
    )
    open_paths = ", ".join(f"`{p}`" for p in settings.open_paths)
    key = (
        "**This server requires an API key**: send `Authorization: Bearer <key>` on every "
        f"route{f' except {open_paths}' if open_paths else ''}; without it, 401. Use "
        "*Authorize* to try the routes here."
        if settings.api_key
        else "No API key is set on this server (`DLSERVE_API_KEY`): every route is open."
    )
    batching = (
        " Requests that arrive together run as one batch (adaptive batching)."
        if settings.batching
        else ""
    )
    return f"""\
Deep-learning models on ONNX Runtime behind HTTP routes.{batching} Every predict route
takes a list, so one request can carry many items. [Try the models in the demo page](./demo).

| model | what it does | version answering | routes |
|---|---|---|---|
{models}

Client mistakes get a 4xx with a JSON body `{{"error": "..."}}` that names the field and
what was expected; each route lists the ones it can answer.

**Limits** (per request unless said; a request over one is refused with its setting's name):
body {settings.max_body_bytes:,} bytes (`DLSERVE_MAX_BODY_BYTES`, 413);
{settings.max_items:,} images or texts (`DLSERVE_MAX_ITEMS`, 413);
{settings.max_text_chars:,} characters per text (`DLSERVE_MAX_TEXT_CHARS`, 413);
{settings.max_ratings:,} ratings or movie ids (`DLSERVE_MAX_RATINGS`, 413);
{settings.max_image_pixels:,} pixels per image (`DLSERVE_MAX_IMAGE_PIXELS`, 413);
{settings.max_concurrency:,} requests in hand per worker (`DLSERVE_MAX_CONCURRENCY`, 429);
{settings.request_timeout_s:g} s to answer (`DLSERVE_REQUEST_TIMEOUT_S`, 504).

**Authentication**: {key}

**Health and metrics**: `/livez` and `/readyz` for probes; Prometheus metrics on
`/metrics`. The machine-readable document is [docs.json](./docs.json).
"""


def errors(statuses: Iterable[int]) -> dict[str, Any]:
    return {
        str(status): {
            "description": ERRORS[status],
            "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}},
        }
        for status in statuses
    }


def schema(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    """A reference to `model`'s schema, which goes into `schemas` with those it uses."""
    raw = model.model_json_schema(ref_template=REF)
    schemas.update(raw.pop("$defs", {}))
    schemas[model.__name__] = raw
    return {"$ref": REF.format(model=model.__name__)}


def operation(
    op: Operation, schemas: dict[str, Any], served: dict[str, ModelSpec]
) -> dict[str, Any]:
    described: dict[str, Any] = {
        "tags": [op.tag],
        "summary": op.summary,
        "operationId": f"dlserve__{op.method.lower()}_{op.path.strip('/').replace('/', '_')}",
        "responses": {
            "200": {
                "description": "Successful Response",
                "content": {"application/json": {"schema": schema(op.response, schemas)}},
            },
            **errors(op.errors),
        },
    }
    described["parameters"] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "description": about,
            "schema": {"type": "string", **({"enum": list(served)} if name == "name" else {})},
        }
        for name, about in op.path_params.items()
    ]
    if op.query is not None:
        described["parameters"] += parameters(op.query)
    if not described["parameters"]:
        del described["parameters"]
    if op.request is not None:
        media: dict[str, Any] = {"schema": schema(op.request, schemas)}
        examples = {
            name: {"summary": name, "value": value}
            for name, spec in served.items()
            if op.example and (value := op.example(spec)) is not None
        }
        if examples:
            media["examples"] = examples
        described["requestBody"] = {"required": True, "content": {"application/json": media}}
    return described


def parameters(query: type[BaseModel]) -> list[dict[str, Any]]:
    """A query model's fields as OpenAPI query parameters."""
    raw = query.model_json_schema()
    required = set(raw.get("required", ()))
    return [
        {
            "name": name,
            "in": "query",
            "required": name in required,
            "description": field.get("description", ""),
            "schema": {k: v for k, v in field.items() if k not in ("description", "title")},
        }
        for name, field in raw["properties"].items()
    ]
