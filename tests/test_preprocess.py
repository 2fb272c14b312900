"""MNIST-style preprocessing of user images (greyscale, polarity, crop, 20×20 fit, centring)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlserve.errors import InputError, PayloadTooLarge
from dlserve.preprocess.images import decode_image, normalize, to_mnist
from readers.mnist import load_mnist
from tests.images import as_user_file


@pytest.fixture(scope="module")
def digits(data_dir: Path) -> np.ndarray:
    return load_mnist(data_dir, "test").images[:20]


@pytest.mark.parametrize("variant", [0, 1, 2, 3])
def test_user_files_come_out_like_mnist(digits: np.ndarray, variant: int) -> None:
    for digit in digits:
        data, _ = as_user_file(digit, variant)
        out = to_mnist(decode_image(data, max_pixels=10**6))
        assert out.shape == (28, 28) and out.max() == pytest.approx(255, abs=1)
        ys, xs = np.nonzero(out > 0.2 * 255)
        assert np.ptp(ys) < 21 and np.ptp(xs) < 21  # fitted in the 20×20 box
        cy, cx = (np.indices(out.shape) * out).sum(axis=(1, 2)) / out.sum()
        assert abs(cy - 14) < 1.5 and abs(cx - 14) < 1.5  # centred by mass
        # Ink bright on dark, and close to the original digit.
        corr = np.corrcoef(out.ravel(), digit.astype(np.float32).ravel())[0, 1]
        assert corr > 0.6, corr


def test_transparent_canvas_with_dark_strokes(digits: np.ndarray) -> None:
    rgba = np.zeros((56, 56, 4), dtype=np.uint8)
    big = np.asarray(Image.fromarray(digits[0]).resize((56, 56)))
    rgba[..., 3] = big  # black strokes, opacity = ink
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    out = to_mnist(decode_image(buf.getvalue(), max_pixels=10**6))
    assert np.corrcoef(out.ravel(), digits[0].ravel().astype(float))[0, 1] > 0.6


def test_blank_image_is_refused() -> None:
    buf = io.BytesIO()
    Image.new("L", (40, 40), 255).save(buf, "PNG")
    with pytest.raises(InputError, match="no digit found"):
        to_mnist(decode_image(buf.getvalue(), max_pixels=10**6))


def test_too_many_pixels_is_refused_before_decoding() -> None:
    buf = io.BytesIO()
    Image.new("L", (3000, 3000), 0).save(buf, "PNG")
    with pytest.raises(PayloadTooLarge, match="3000×3000 pixels"):
        decode_image(buf.getvalue(), max_pixels=2000 * 2000)


def test_normalize_matches_training_constants() -> None:
    x = normalize(np.full((2, 28, 28), 255, dtype=np.uint8), 0.5, 0.25)
    assert x.shape == (2, 1, 28, 28) and x.dtype == np.float32
    assert np.allclose(x, 2.0)
