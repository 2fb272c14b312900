"""digits: handwritten digit classification, LeNet-5 on MNIST.

Two routes: 28×28 pixel arrays as JSON (or their compact base64 form), and one PNG or
JPEG file preprocessed the way MNIST was made (`dlserve.preprocess.images.to_mnist`).
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictFloat

from dlserve.errors import InputError, PayloadTooLarge, check_item_list
from dlserve.prepared import Prepared
from dlserve.preprocess.images import SIDE, decode_image, to_mnist
from dlserve.protocol import TensorDecl, Tensors
from dlserve.registry import DataSource, ModelSpec, PrecisionPlan, Ref, Route
from dlserve.runners.digits import DigitsRunner
from dlserve.settings import Settings

FIELD = "images"
FIELD_B64 = "images_base64"
# The request example in /docs.json: a hand-drawn 7; ".", "+" and "#" are 0, 128 and 255.
EXAMPLE_SEVEN = """
............................
............................
............................
............................
............................
......+##############+......
......################......
.......++++++++++####+......
................####........
...............+###+........
...............####.........
..............+###+.........
..............####..........
.............+###+..........
.............####...........
............+###+...........
............####............
...........+###+............
...........####.............
..........+###+.............
..........####..............
.........+###+..............
.........####...............
.........+##+...............
............................
............................
............................
............................
"""


def example_pixels() -> list[list[int]]:
    shade = {".": 0, "+": 128, "#": 255}
    return [[shade[c] for c in row] for row in EXAMPLE_SEVEN.split()]


class DigitsRequest(BaseModel):
    # The compact form: as arrays, the example would fill 784 lines of the docs page.
    model_config = ConfigDict(
        json_schema_extra={
            "example": {FIELD_B64: [base64.b64encode(bytes(sum(example_pixels(), []))).decode()]}
        }
    )
    images: list[list[list[StrictFloat]]] | None = Field(
        None, description="28×28 arrays of pixel values 0-255, ink bright on dark (as MNIST)"
    )
    images_base64: list[str] | None = Field(
        None,
        description="the compact form of `images`: each image the base64 of its 784 "
        "uint8 pixels, row by row; send one of the two fields",
    )


class DigitPrediction(BaseModel):
    digit: int = Field(ge=0, le=9)
    confidence: float = Field(description="the probability of `digit`")
    probabilities: list[float] = Field(description="one per digit 0-9, summing to 1")


class DigitsResponse(BaseModel):
    model: str = Field(description="model tag, digits:<version>")
    predictions: list[DigitPrediction]


def _find_bad_image(images: list[Any] | np.ndarray) -> str:
    """The message for the first image that is not a 28×28 array of numbers."""
    expected = f"expected a {SIDE}×{SIDE} array of numbers 0-255"
    for i, image in enumerate(images):
        try:
            shape = np.asarray(image, dtype=np.float32).shape
        except (ValueError, TypeError):
            return f"{FIELD}[{i}]: {expected}; it holds non-numbers or rows of unequal length"
        if shape != (SIDE, SIDE):
            return f"{FIELD}[{i}]: {expected}, got shape {shape}"
    return f"{FIELD}: expected a list of {SIDE}×{SIDE} arrays"


def parse_fast(body: bytes) -> DigitsRequest | None:
    """`{"images": [...]}` holding nothing but numbers, straight to float32 pixels with
    orjson and numpy, without building a Python float per pixel through pydantic first:
    pydantic took 10 % of a worker's time under the digits cell (py-spy, one worker, 64
    clients). None, so that DigitsRequest's own parse reports the problem, for anything
    else: a string, true/false/null anywhere (numpy would read "1" and true as numbers),
    another field, a list that is not three deep and even, a number float32 cannot hold."""
    if body.count(b'"') != 2 or b"true" in body or b"false" in body or b"null" in body:
        return None
    try:
        data = orjson.loads(body)
        images = data["images"] if type(data) is dict and len(data) == 1 else None
        with np.errstate(over="ignore"):  # 1e300: inf, refused below
            pixels = np.asarray(images, dtype=np.float32) if type(images) is list else None
    except (orjson.JSONDecodeError, KeyError, ValueError, TypeError):
        return None
    if pixels is None or pixels.ndim != 3 or not np.isfinite(pixels).all():
        return None
    return DigitsRequest.model_construct(images=pixels, images_base64=None)


def parse_images(images: list[Any] | np.ndarray, *, max_items: int) -> np.ndarray:
    """Validate a JSON list of images (or parse_fast's float32 array of them) → float32
    [N, 28, 28]; InputError names the culprit."""
    check_item_list(
        images, FIELD, expected=f"{SIDE}×{SIDE} arrays", noun="images", max_items=max_items
    )
    try:
        pixels = np.asarray(images, dtype=np.float32)
    except (ValueError, TypeError):
        pixels = None
    if pixels is None or pixels.shape[1:] != (SIDE, SIDE):
        raise InputError(_find_bad_image(images))
    return check_pixels(pixels, FIELD, sent=images)


def check_pixels(
    pixels: np.ndarray, field: str, sent: list[Any] | np.ndarray | None = None
) -> np.ndarray:
    """Pixels that are finite and 0-255; InputError names the first that is not. `sent` is
    what the client sent, to quote a value float32 could not hold (1e308)."""
    if pixels.dtype == np.uint8:
        return pixels
    # One vectorised test for the common case; locate the culprit only when it fails.
    finite = np.isfinite(pixels)
    if not finite.all():
        i, r, c = np.argwhere(~finite)[0]
        value = sent[i][r][c] if sent is not None else None
        if isinstance(value, int | float) and math.isfinite(value):  # beyond float32
            raise InputError(f"{field}[{i}][{r}][{c}]: {value:g} is outside the pixel range 0-255")
        raise InputError(f"{field}[{i}][{r}][{c}]: {pixels[i, r, c]} is not a finite number")
    if pixels.min() < 0 or pixels.max() > 255:
        i, r, c = np.argwhere((pixels < 0) | (pixels > 255))[0]
        raise InputError(
            f"{field}[{i}][{r}][{c}]: {float(pixels[i, r, c]):g} is outside the pixel range 0-255"
        )
    return pixels


def parse_images_base64(images: list[Any], *, max_items: int) -> np.ndarray:
    """The compact form: each image a base64 string of its 784 uint8 pixels, row-major.

    A 28×28 image is 1,048 base64 characters instead of ~2,500 of JSON numbers, and it
    decodes without parsing or checking a number per pixel (uint8 is always in range)."""
    check_item_list(
        images, FIELD_B64, expected="base64 strings", noun="images", max_items=max_items
    )
    size = SIDE * SIDE
    raw = bytearray()
    for i, text in enumerate(images):
        try:
            decoded = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise InputError(f"{FIELD_B64}[{i}]: not a base64 string") from None
        if len(decoded) != size:
            raise InputError(
                f"{FIELD_B64}[{i}]: {len(decoded)} bytes once decoded; expected "
                f"{size} (28×28 uint8 pixels, row by row)"
            )
        raw += decoded
    return np.frombuffer(bytes(raw), dtype=np.uint8).reshape(len(images), SIDE, SIDE)


def prepare_arrays(runner: DigitsRunner, request: DigitsRequest, settings: Settings) -> Prepared:
    """A /digits/predict body's two alternative fields → [N, 28, 28] pixels."""
    if (request.images is None) == (request.images_base64 is None):
        raise InputError(
            f"send exactly one of `{FIELD}` (arrays of numbers) and "
            f"`{FIELD_B64}` (base64 uint8 pixels)"
        )
    if request.images is not None:
        pixels = parse_images(request.images, max_items=settings.max_items)
    else:
        pixels = parse_images_base64(request.images_base64 or [], max_items=settings.max_items)
    return Prepared(pixels, len(pixels))


def prepare_file(runner: DigitsRunner, body: bytes, settings: Settings) -> Prepared:
    """One PNG/JPEG body → [1, 28, 28], preprocessed the MNIST way."""
    return Prepared(to_mnist(decode_image(body, max_pixels=settings.max_image_pixels))[None], 1)


def prediction_arrays(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[N, 10] probabilities → each prediction's digit, confidence and probabilities
    (rounded to 6 decimals), as arrays: the HTTP answer's fields and batch scoring's columns."""
    digits = probs.argmax(axis=1)
    rounded = np.round(probs.astype(np.float64), 6)
    return digits, rounded[np.arange(len(digits)), digits], rounded


def predictions(probs: np.ndarray) -> list[DigitPrediction]:
    """[N, 10] probabilities → one prediction each."""
    digits, confidence, rounded = prediction_arrays(probs)
    return [
        DigitPrediction(digit=int(d), confidence=float(c), probabilities=row.tolist())
        for d, c, row in zip(digits, confidence, rounded, strict=True)
    ]


def respond(runner: DigitsRunner, prepared: Prepared, probs: np.ndarray) -> DigitsResponse:
    return DigitsResponse(model=runner.tag, predictions=predictions(probs))


def prepare_tensors(
    runner: DigitsRunner,
    inputs: dict[str, np.ndarray],
    parameters: dict[str, Any],
    settings: Settings,
) -> Prepared:
    """The protocol's `pixels`, [N, 28, 28] or [N, 1, 28, 28], UINT8 or FP32 0-255."""
    pixels = inputs["pixels"]
    if pixels.ndim == 4 and pixels.shape[1] == 1:
        pixels = pixels[:, 0]
    if pixels.ndim != 3 or pixels.shape[1:] != (SIDE, SIDE) or not len(pixels):
        raise InputError(
            f"pixels: expected shape [N, {SIDE}, {SIDE}] or [N, 1, {SIDE}, "
            f"{SIDE}] with N ≥ 1, got {list(inputs['pixels'].shape)}"
        )
    if len(pixels) > settings.max_items:
        raise PayloadTooLarge(
            f"pixels: {len(pixels)} images is more than the limit of "
            f"{settings.max_items} per request"
        )
    return Prepared(check_pixels(pixels, "pixels"), len(pixels))


def tensor_outputs(
    runner: DigitsRunner, prepared: Prepared, probs: np.ndarray
) -> dict[str, np.ndarray]:
    return {"probabilities": probs.astype(np.float32), "digit": probs.argmax(axis=1)}


def mnist(settings: Settings) -> DataSource:
    return DataSource(settings.data_dir, settings.mnist_url)


MODEL = ModelSpec(
    name="digits",
    task="image-classification",
    summary="handwritten digit classification: LeNet-5 trained on MNIST",
    runner=DigitsRunner,
    routes=(
        Route(
            "/digits/predict",
            "Classify 28×28 digit images sent as pixel arrays",
            DigitsResponse,
            prepare_arrays,
            respond,
            request=DigitsRequest,
            parse_fast=parse_fast,
        ),
        Route(
            "/digits/predict_image",
            "Classify one PNG or JPEG file of a digit (any size, colour and polarity)",
            DigitsResponse,
            prepare_file,
            respond,
            content_types=("image/*", "application/octet-stream"),
        ),
    ),
    tensors=Tensors(
        inputs=(TensorDecl("pixels", ("UINT8", "FP32"), (-1, SIDE, SIDE)),),
        outputs=(
            TensorDecl("probabilities", ("FP32",), (-1, 10)),
            TensorDecl("digit", ("INT64",), (-1,)),
        ),
        prepare=prepare_tensors,
        answer=tensor_outputs,
        example={
            "inputs": [
                {
                    "name": "pixels",
                    "datatype": "UINT8",
                    "shape": [1, SIDE, SIDE],
                    "data": sum(example_pixels(), []),
                }
            ]
        },
    ),
    data=mnist,
    train=Ref("training.digits:train"),
    export=Ref("export.digits:export"),
    evaluate=Ref("evaluation.digits:evaluate"),
    workload=Ref("bench.workloads:DIGITS"),
    scoring=Ref("scoring.digits:SCORER"),
    # INT8 may cost at most 0.3 accuracy points on the MNIST test split. Static (QDQ, ranges
    # calibrated on 512 training images): ONNX Runtime fuses it into QLinearConv, 1.9-4x
    # faster than dynamic INT8, whose ConvInteger is a slow kernel (measured at batch 64 on
    # the 2-core AVX2 machine; docs/providers-and-precision.md).
    precision=PrecisionPlan(
        metric="accuracy",
        max_loss=0.003,
        int8="static",
        calibration=Ref("export.digits:calibration"),
    ),
    train_minutes=0.7,  # about 40 s on 2 cores
)
