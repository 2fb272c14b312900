"""A route's fast parse (`Route.parse_fast`, /digits/predict's) changes no outcome: every
body gives the same pixels, or the same error with the same status, with it as without."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest

from dlserve.errors import InputError
from dlserve.models import digits
from dlserve.registry import Route
from dlserve.settings import Settings

ROUTE = next(r for r in digits.MODEL.routes if r.path == "/digits/predict")
SLOW = dataclasses.replace(ROUTE, parse_fast=None)
SETTINGS = Settings()
ROW = "[" + ",".join(["0"] * 28) + "]"


def image(first: str = "0", rows: int = 28) -> str:
    return "[[" + first + ",0" * 27 + "]" + ("," + ROW) * (rows - 1) + "]"


RNG = np.random.default_rng(0)
WELL_FORMED = {
    "one image of ints": orjson.dumps({"images": RNG.integers(0, 256, (1, 28, 28)).tolist()}),
    "three images of floats": orjson.dumps({"images": (RNG.random((3, 28, 28)) * 255).tolist()}),
    "spaces and newlines": b'{ "images" :\n [' + image().encode() + b"] }",
    "an escaped key": b'{"\\u0069mages": [' + image().encode() + b"]}",
}
ODD = {
    "pixel -5": '{"images": [' + image("-5") + "]}",
    "pixel 255.5": '{"images": [' + image("255.5") + "]}",
    "pixel 1e308": '{"images": [' + image("1e308") + "]}",
    "pixel NaN": '{"images": [' + image("NaN") + "]}",
    "pixel string": '{"images": [' + image('"7"') + "]}",
    "pixel true": '{"images": [' + image("true") + "]}",
    "pixel null": '{"images": [' + image("null") + "]}",
    "27 rows": '{"images": [' + image(rows=27) + "]}",
    "ragged rows": '{"images": [[[1,2],[3]]]}',
    "four deep": '{"images": [[' + image() + "]]}",
    "flat image": '{"images": [[' + ",".join(["0"] * 784) + "]]}",
    "no images": '{"images": []}',
    "257 images": '{"images": [' + ",".join([image()] * 257) + "]}",
    "an extra field": '{"images": [' + image() + '], "k": 3}',
    "both fields": '{"images": [' + image() + '], "images_base64": []}',
    "images null": '{"images": null}',
    "a list body": "[" + image() + "]",
    "huge integer": '{"images": [[[' + "9" * 400 + "]]]}",
    "not JSON": "images",
}


def outcome(route: Route, body: bytes) -> tuple[object, ...]:
    try:
        pixels = route.prepare(None, route.parse(body), SETTINGS).part
    except InputError as exc:
        return type(exc).__name__, exc.status, str(exc)
    return "ok", pixels.dtype.str, pixels.tolist()


@pytest.mark.parametrize("name", [*WELL_FORMED, *ODD])
def test_the_fast_parse_changes_no_outcome(name: str) -> None:
    body = WELL_FORMED[name] if name in WELL_FORMED else ODD[name].encode()
    assert outcome(ROUTE, body) == outcome(SLOW, body)


@pytest.mark.parametrize("name", WELL_FORMED)
def test_well_formed_bodies_take_the_fast_parse(name: str) -> None:
    assert isinstance(digits.parse_fast(WELL_FORMED[name]).images, np.ndarray)
