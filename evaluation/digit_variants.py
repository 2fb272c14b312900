"""Held-out digits as users send them: drawn, photographed and scanned rather than MNIST's
centred, even strokes. `dlserve eval digits` reports the model's accuracy on these beside the
plain one (`transformed_accuracy`).

Every held-out image gets one variant, reproducibly (seeded): a random mix of the kinds
below, each at a strength drawn up to its limit, as a user's digit can be small, slanted,
thick and faint at once. Each kind is also applied alone at its full strength
(`transformed_by_kind`), which says where the model is weak. Pillow does the image work
(affine maps, min/max filters, blur), as it does for uploads (dlserve/preprocess/images.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

SEED = 0
SIDE = 28
# The strongest change of each kind: what our trials of drawn and scanned digits showed
# (thick or thin strokes, small in a large canvas, slanted, low contrast, coarse scans).
MAX_ROTATION_DEG = 20.0
MIN_SCALE, MAX_SCALE = 0.65, 1.1  # 0.65: a digit drawn small in the middle of a canvas
MAX_SHIFT_PX = 3.0
MAX_SHEAR = 0.35
MAX_BLUR = 1.0  # Gaussian radius, pixels
MAX_NOISE = 40.0  # standard deviation, of 255
MIN_CONTRAST = 0.4  # ink at 40 % of its intensity
COARSE_SIDE = 14  # a scan at half the resolution
MIX_CHANCE = 0.5  # of each kind, in the mixed variant of an image

Variant = Callable[[Image.Image, float, np.random.Generator], Image.Image]


def _affine(
    img: Image.Image, angle: float, scale: float, shear: float, dx: float, dy: float
) -> Image.Image:
    """Rotate, scale and shear about the centre, then shift; Pillow's map is output → input."""
    c = (SIDE - 1) / 2
    cos, sin = math.cos(angle), math.sin(angle)
    # forward: x' = S·R·Sh·(x - c) + c + d; Pillow wants the inverse, row-major a..f
    fwd = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]]) * scale
    inv = np.linalg.inv(fwd)
    offset = np.array([c, c]) - inv @ np.array([c + dx, c + dy])
    coefficients = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    return img.transform(img.size, Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR)


def rotation(img: Image.Image, s: float, rng: np.random.Generator) -> Image.Image:
    return _affine(img, math.radians(MAX_ROTATION_DEG * s * rng.choice([-1, 1])), 1, 0, 0, 0)


def scale(img: Image.Image, s: float, rng: np.random.Generator) -> Image.Image:
    factor = 1 + s * ((MIN_SCALE - 1) if rng.random() < 0.75 else (MAX_SCALE - 1))
    return _affine(img, 0, factor, 0, 0, 0)


def shift(img: Image.Image, s: float, rng: np.random.Generator) -> Image.Image:
    dx, dy = rng.uniform(-1, 1, 2) * MAX_SHIFT_PX * s
    return _affine(img, 0, 1, 0, dx, dy)


def shear(img: Image.Image, s: float, rng: np.random.Generator) -> Image.Image:
    return _affine(img, 0, 1, MAX_SHEAR * s * rng.choice([-1, 1]), 0, 0)


def thickness(img: Image.Image, s: float, rng: np.random.Generator) -> Image.Image:
    """A 3×3 max filter thickens the strokes (ink is bright), a min filter thins them."""
    if s < 0.5:
        return img
    return img.filter(ImageFilter.MaxFilter(3) if rng.random() < 0.5 else ImageFilter.MinFilter(3))


def blur(img: Image.Image, s: float, rng: np.random.Generator) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(MAX_BLUR * s))


def contrast(img: Image.Image, s: float, rng: np.random.Generator) -> Image.Image:
    ink = 1 - (1 - MIN_CONTRAST) * s
    return Image.fromarray((np.asarray(img, dtype=np.float32) * ink).astype(np.uint8))


def coarse(img: Image.Image, s: float, rng: np.random.Generator) -> Image.Image:
    side = round(SIDE - (SIDE - COARSE_SIDE) * s)
    return img.resize((side, side), Image.Resampling.BOX).resize(
        (SIDE, SIDE), Image.Resampling.NEAREST
    )


def noise(img: Image.Image, s: float, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, MAX_NOISE * s, (SIDE, SIDE))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# In the order a digit meets them: drawn (geometry, stroke), then captured (blur, faint ink,
# resolution), then sensor noise.
KINDS: dict[str, Variant] = {
    "rotation": rotation,
    "scale": scale,
    "shift": shift,
    "shear": shear,
    "thickness": thickness,
    "blur": blur,
    "contrast": contrast,
    "coarse": coarse,
    "noise": noise,
}


def mixed(images: np.ndarray, seed: int = SEED) -> np.ndarray:
    """One variant of each image: each kind with a chance of MIX_CHANCE, at a random
    strength (0 to its limit). Every kind at once made most digits unreadable to people."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        img = Image.fromarray(image)
        for variant in KINDS.values():
            strength = float(rng.random())
            if rng.random() < MIX_CHANCE:
                img = variant(img, strength, rng)
        out[i] = np.asarray(img)
    return out


def one_kind(images: np.ndarray, kind: str, seed: int = SEED) -> np.ndarray:
    """Each image changed by `kind` alone, at its full strength."""
    rng = np.random.default_rng(seed)
    variant = KINDS[kind]
    return np.stack([np.asarray(variant(Image.fromarray(image), 1.0, rng)) for image in images])
