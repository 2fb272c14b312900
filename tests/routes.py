"""One valid and one bad request for every predict route a running server publishes, read
from its /docs.json: a JSON route's example (each request type declares one; a route of
every model, `/v2/models/{name}/infer`, one per model, which gives its `{name}` and, from
the model's tag, its `{version}`), and for a file route a PNG of a digit. The bad request
is an empty JSON object (a required field is missing) or bytes that are not an image:
both a 400 naming the problem."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import orjson
from PIL import Image

JSON = "application/json"


@dataclass(frozen=True)
class RouteCase:
    path: str
    model: str
    content_type: str
    valid: bytes
    bad: bytes


def digit_png() -> bytes:
    """A dark "1" on white, as a photo of a handwritten digit would be."""
    pixels = np.full((64, 64), 255, np.uint8)
    pixels[10:54, 28:36] = 0
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _schema(docs: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return docs["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def request_examples(docs: dict[str, Any], path: str, body: dict[str, Any]) -> dict[str, Any]:
    """Each path `path` stands for (a template gives one per model), with its example."""
    if "{name}" not in path:
        schema = _schema(docs, body["schema"])
        assert "example" in schema, f"{path}: its request type declares no example"
        return {path: schema["example"]}
    tags = docs["info"]["x-dlserve-models"]
    assert body.get("examples", {}).keys() == tags.keys(), f"{path}: not one example per model"
    return {
        path.format(name=name, version=tags[name].split(":")[1]): example["value"]
        for name, example in body["examples"].items()
    }


def route_cases(docs: dict[str, Any]) -> list[RouteCase]:
    """A case for every POST route of the OpenAPI document `docs`."""
    cases = []
    for path, operations in docs["paths"].items():
        # The model repository's routes load and unload models: not predictions, and off
        # unless DLSERVE_MODEL_CONTROL is on (tests/test_rollout.py calls them).
        if "post" not in operations or path.startswith("/v2/repository/"):
            continue
        content = operations["post"]["requestBody"]["content"]
        content_type, body = next(iter(content.items()))
        if content_type == JSON:
            for real, example in request_examples(docs, path, body).items():
                model = real.split("/")[3 if real.startswith("/v2/") else 1]
                cases.append(RouteCase(real, model, JSON, orjson.dumps(example), b"{}"))
        else:
            assert content_type.startswith("image/"), f"{path}: no request for {content_type}"
            cases.append(
                RouteCase(path, path.split("/")[1], "image/png", digit_png(), b"not an image")
            )
    return cases


def post(client: httpx.Client, case: RouteCase, body: bytes) -> httpx.Response:
    return client.post(case.path, content=body, headers={"Content-Type": case.content_type})
