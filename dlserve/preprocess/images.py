"""Digit-image preprocessing: one implementation for training, evaluation and serving.

`normalize` turns 28×28 pixel arrays (0-255, ink bright) into the model's input tensor.
`to_mnist` turns an arbitrary photo or scan of one digit into such a 28×28 array the way
MNIST itself was made (LeCun et al.): greyscale, ink bright on black, cropped to the ink,
scaled to fit a 20×20 box with its aspect ratio kept, then centred by centre of mass in
a 28×28 field.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dlserve.errors import InputError, PayloadTooLarge, UnsupportedMediaType

# Mean and standard deviation of MNIST training pixels scaled to [0, 1]; they travel in
# the model manifest so that serving uses what training used.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
SIDE = 28
BOX = 20
MIN_IMAGE_SIDE = 8
ACCEPTED_FORMATS = ("PNG", "JPEG")
# Pixels brighter than this share of the brightest one count as ink when cropping.
INK_THRESHOLD = 0.2


def normalize(images: np.ndarray, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> np.ndarray:
    """[N, 28, 28] pixels in 0-255 → float32 [N, 1, 28, 28], standardised."""
    x = images.astype(np.float32, copy=False) * np.float32(1.0 / 255.0)
    return ((x - np.float32(mean)) * np.float32(1.0 / std))[:, None, :, :]


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode a PNG or JPEG body, refusing anything that is not one or is too big."""
    if not data:
        raise InputError("body: empty; send one PNG or JPEG image as the request body")
    try:
        # Our own pixel limit (checked below, before decoding) is lower than Pillow's bomb
        # warning threshold and gives the clearer message; Pillow's hard limit stays on.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(
            f"image: more than the limit of {max_pixels} pixels (DLSERVE_MAX_IMAGE_PIXELS): {exc}"
        ) from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError("body: not a PNG or JPEG image (could not identify the format)") from exc
    if img.format not in ACCEPTED_FORMATS:
        raise UnsupportedMediaType(f"image: format {img.format} is not accepted; send PNG or JPEG")
    width, height = img.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image: {width}×{height} pixels is more than the limit of {max_pixels} pixels "
            "(DLSERVE_MAX_IMAGE_PIXELS)"
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise InputError(
            f"image: {width}×{height} pixels is too small; at least "
            f"{MIN_IMAGE_SIDE}×{MIN_IMAGE_SIDE} is needed to see a digit"
        )
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"image: truncated or corrupt {img.format} data ({exc})") from exc
    return img


def _greyscale(img: Image.Image) -> np.ndarray:
    """Luminance as float32; transparent areas become the background behind the ink."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        lum = np.asarray(rgba.convert("L"), dtype=np.float32)
        opaque = alpha > 0.5
        # Strokes drawn on a transparent canvas: put them on the opposite shade.
        ink_is_light = opaque.any() and lum[opaque].mean() > 127
        background = 0.0 if ink_is_light else 255.0
        composed: np.ndarray = lum * alpha + background * (1.0 - alpha)
        return composed
    return np.asarray(img.convert("L"), dtype=np.float32)


def to_mnist(img: Image.Image) -> np.ndarray:
    """Any single-digit image → float32 [28, 28] in 0-255, ink bright, MNIST-centred."""
    grey = _greyscale(img)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = float(np.median(border))
    if background > 127:  # dark ink on light paper: make the ink bright as in MNIST
        grey, background = 255.0 - grey, 255.0 - background
    ink = np.clip(grey - background, 0.0, None)
    peak = float(ink.max())
    if peak < 16:  # less than ~6 % contrast anywhere: nothing to read
        raise InputError("image: no digit found (the image is blank or has no contrast)")
    ink *= 255.0 / peak
    rows = np.flatnonzero((ink > INK_THRESHOLD * 255).any(axis=1))
    cols = np.flatnonzero((ink > INK_THRESHOLD * 255).any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    h, w = crop.shape
    scale = BOX / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    patch = np.asarray(
        Image.fromarray(crop.astype(np.float32), mode="F").resize(
            (new_w, new_h), Image.Resampling.LANCZOS
        ),
        dtype=np.float32,
    ).clip(0.0, 255.0)

    total = float(patch.sum())
    ys, xs = np.indices(patch.shape)
    cy = float((ys * patch).sum()) / total if total else new_h / 2
    cx = float((xs * patch).sum()) / total if total else new_w / 2
    top = int(np.clip(round(SIDE / 2 - cy), 0, SIDE - new_h))
    left = int(np.clip(round(SIDE / 2 - cx), 0, SIDE - new_w))
    out = np.zeros((SIDE, SIDE), dtype=np.float32)
    out[top : top + new_h, left : left + new_w] = patch
    return out
