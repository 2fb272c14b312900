"""The digits runner: 28×28 pixel arrays or image files in, digit probabilities out."""

from __future__ import annotations

import base64
import binascii
import math
from pathlib import Path
from typing import Any

import numpy as np

from dlserve.data.mnist import load_mnist
from dlserve.errors import InputError, check_item_list
from dlserve.models.base import Runner, accuracy_report, softmax, split_rows
from dlserve.preprocess.images import SIDE, decode_image, normalize, to_mnist

FIELD = "images"
FIELD_B64 = "images_base64"


def _find_bad_image(images: list[Any]) -> str:
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


def parse_images(images: list[Any], *, max_items: int) -> np.ndarray:
    """Validate a JSON list of images → float32 [N, 28, 28]; InputError names the culprit."""
    check_item_list(images, FIELD, expected=f"{SIDE}×{SIDE} arrays", noun="images",
                    max_items=max_items)
    try:
        pixels = np.asarray(images, dtype=np.float32)
    except (ValueError, TypeError):
        pixels = None
    if pixels is None or pixels.shape[1:] != (SIDE, SIDE):
        raise InputError(_find_bad_image(images))
    # One vectorised test for the common case; locate the culprit only when it fails.
    finite = np.isfinite(pixels)
    if not finite.all():
        i, r, c = np.argwhere(~finite)[0]
        sent = images[i][r][c]
        if isinstance(sent, int | float) and math.isfinite(sent):  # beyond float32, e.g. 1e308
            raise InputError(f"{FIELD}[{i}][{r}][{c}]: {sent:g} is outside the pixel range 0-255")
        raise InputError(f"{FIELD}[{i}][{r}][{c}]: {pixels[i, r, c]} is not a finite number")
    if pixels.min() < 0 or pixels.max() > 255:
        i, r, c = np.argwhere((pixels < 0) | (pixels > 255))[0]
        raise InputError(
            f"{FIELD}[{i}][{r}][{c}]: {float(pixels[i, r, c]):g} is outside the pixel range 0-255")
    return pixels


def parse_images_base64(images: list[Any], *, max_items: int) -> np.ndarray:
    """The compact form: each image a base64 string of its 784 uint8 pixels, row-major.

    A 28×28 image is 1,048 base64 characters instead of ~2,500 of JSON numbers, and it
    decodes without parsing or checking a number per pixel (uint8 is always in range)."""
    check_item_list(images, FIELD_B64, expected="base64 strings", noun="images",
                    max_items=max_items)
    size = SIDE * SIDE
    raw = bytearray()
    for i, text in enumerate(images):
        try:
            decoded = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise InputError(f"{FIELD_B64}[{i}]: not a base64 string") from None
        if len(decoded) != size:
            raise InputError(f"{FIELD_B64}[{i}]: {len(decoded)} bytes once decoded; expected "
                             f"{size} (28×28 uint8 pixels, row by row)")
        raw += decoded
    return np.frombuffer(bytes(raw), dtype=np.uint8).reshape(len(images), SIDE, SIDE)


def parse_digits_request(images: list[Any] | None, images_base64: list[Any] | None, *,
                         max_items: int) -> np.ndarray:
    """A /digits/predict body's two alternative fields → [N, 28, 28] pixels."""
    if (images is None) == (images_base64 is None):
        raise InputError(f"send exactly one of `{FIELD}` (arrays of numbers) and "
                         f"`{FIELD_B64}` (base64 uint8 pixels)")
    if images is not None:
        return parse_images(images, max_items=max_items)
    return parse_images_base64(images_base64, max_items=max_items)


def image_file_to_pixels(data: bytes, *, max_pixels: int) -> np.ndarray:
    """One PNG/JPEG body → float32 [1, 28, 28], preprocessed the MNIST way."""
    return to_mnist(decode_image(data, max_pixels=max_pixels))[None]


class DigitsRunner(Runner):
    name = "digits"

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """[N, 28, 28] pixels 0-255 → [N, 10] probabilities."""
        prep = self.stored.manifest.preprocessing
        x = normalize(pixels, prep["mean"], prep["std"])
        (logits,) = self.session.run({self.session.input_names[0]: x})
        return softmax(logits)

    def run_batch(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        pixels = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return split_rows(self.predict(pixels), [len(p) for p in parts])

    def warm_up(self) -> None:
        for n in (1, 8, 64):
            self.predict(np.zeros((n, SIDE, SIDE), dtype=np.float32))

    def format(self, probs: np.ndarray) -> list[dict[str, Any]]:
        digits = probs.argmax(axis=1)
        rounded = np.round(probs.astype(np.float64), 6)
        return [
            {"digit": int(d), "confidence": float(row[d]), "probabilities": row.tolist()}
            for d, row in zip(digits, rounded, strict=True)
        ]

    def evaluate(self, data_dir: Path, *, download_url: str | None = None) -> dict[str, Any]:
        test = load_mnist(data_dir, "test", base_url=download_url)
        probs = np.concatenate([
            self.predict(test.images[i: i + 1000]) for i in range(0, len(test.images), 1000)])
        predicted = probs.argmax(axis=1)
        return {
            "model": self.tag,
            "provider": self.provider,
            "dataset": "MNIST",
            "split": "test",
            "examples": int(len(test.labels)),
            **accuracy_report(predicted, test.labels, self.stored.manifest.labels),
            "data_files": test.files,
        }
