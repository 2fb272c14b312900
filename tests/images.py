"""Real PNG/JPEG files made from MNIST test digits, in the shapes users send them."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def as_user_file(digit: np.ndarray, variant: int) -> tuple[bytes, str]:
    """One of four renderings: as-is, dark-on-light RGB ×3, off-centre on a page, JPEG ×2."""
    img = Image.fromarray(digit)
    if variant == 0:
        return encode(img), "image/png"
    if variant == 1:
        rgb = Image.fromarray(255 - digit).convert("RGB").resize((84, 84), Image.BICUBIC)
        return encode(rgb), "image/png"
    if variant == 2:
        page = Image.new("L", (120, 90), 255)
        page.paste(Image.fromarray(255 - digit).resize((56, 56), Image.BICUBIC), (10, 25))
        return encode(page), "image/png"
    return encode(img.resize((56, 56), Image.BICUBIC).convert("RGB"), "JPEG"), "image/jpeg"
