"""One valid and one bad request for every predict route a running server publishes, read
from its /docs.json: a JSON route's example (each request type declares one), and for a
file route a PNG of a digit. The bad request is an empty JSON object (a required field is
missing) or bytes that are not an image: both a 400 naming the problem."""

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


def route_cases(docs: dict[str, Any]) -> list[RouteCase]:
    """A case for every POST route of the OpenAPI document `docs`."""
    cases = []
    for path, operations in docs["paths"].items():
        if "post" not in operations:
            continue
        content = operations["post"]["requestBody"]["content"]
        content_type, body = next(iter(content.items()))
        schema = _schema(docs, body["schema"])
        if content_type == JSON:
            assert "example" in schema, f"{path}: its request type declares no example"
            cases.append(RouteCase(path, JSON, orjson.dumps(schema["example"]), b"{}"))
        else:
            assert content_type.startswith("image/"), f"{path}: no request for {content_type}"
            cases.append(RouteCase(path, "image/png", digit_png(), b"not an image"))
    return cases


def post(client: httpx.Client, case: RouteCase, body: bytes) -> httpx.Response:
    return client.post(case.path, content=body, headers={"Content-Type": case.content_type})
