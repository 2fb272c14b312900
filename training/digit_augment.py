"""Training-time augmentation for the digits model: MNIST's centred, even strokes made to
look like what users send (drawn in the demo page, photographed, scanned), so that the
model learns those too. The kinds match evaluation/digit_variants.py's, which measures them
on the held-out split (with Pillow, not this code): geometry (rotation, scale, mostly
smaller, shift, shear), stroke thickness, blur, faint ink, coarse resolution and noise.

Everything runs on a batch of normalised images at once (a few tensor operations per
batch), each image drawing its own strengths from the run's generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlserve.preprocess.images import MNIST_MEAN, MNIST_STD

# The normalised value of a black pixel, MNIST's background.
BACKGROUND = (0 - MNIST_MEAN) / MNIST_STD


@dataclass(frozen=True)
class Augmentation:
    max_rotation_deg: float = 15.0
    max_shrink: float = 0.35  # a digit drawn small in a large canvas: down to 65 %
    max_grow: float = 0.1
    max_shift: float = 0.1  # of the image side
    max_shear: float = 0.3
    stroke_share: float = 0.3  # images whose strokes are made thicker or thinner
    blur_share: float = 0.2
    coarse_share: float = 0.1  # images seen at half the resolution
    min_ink: float = 0.4  # faint ink: each image's ink scaled by 0.4-1
    max_noise: float = 0.15  # standard deviation, of the pixel range 0-1

    @property
    def off(self) -> bool:
        return self == NONE


NONE = Augmentation(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def augment(x: torch.Tensor, cfg: Augmentation, gen: torch.Generator) -> torch.Tensor:
    """A changed copy of a batch [N, 1, 28, 28] of normalised images."""
    x = _geometry(x, cfg, gen)
    x = _strokes(x, cfg.stroke_share, gen)
    x = _where(_share(x, cfg.blur_share, gen), _blur(x), x)
    x = _where(_share(x, cfg.coarse_share, gen), _coarse(x), x)
    ink = cfg.min_ink + (1 - cfg.min_ink) * _uniform(x, gen)
    x = (x - BACKGROUND) * ink + BACKGROUND
    noise = torch.randn(x.shape, generator=gen) * _uniform(x, gen) * cfg.max_noise / MNIST_STD
    return x + noise.to(x.device)


def _uniform(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One number in [0, 1) per image, shaped to broadcast over it."""
    return torch.rand(x.shape[0], 1, 1, 1, generator=gen).to(x.device)


def _share(x: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    return _uniform(x, gen) < share


def _where(chosen: torch.Tensor, changed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(chosen, changed, x)


def _geometry(x: torch.Tensor, cfg: Augmentation, gen: torch.Generator) -> torch.Tensor:
    """Rotate, scale, shear and shift each image (one grid_sample call)."""
    n = x.shape[0]
    u = torch.rand(n, 5, generator=gen) * 2 - 1
    angle = u[:, 0] * math.radians(cfg.max_rotation_deg)
    # Mostly smaller: three in four images shrink, the rest grow.
    scale = torch.where(
        u[:, 1] < 0.5,
        1 - (u[:, 1] + 1) / 1.5 * cfg.max_shrink,
        1 + (u[:, 1] - 0.5) * 2 * cfg.max_grow,
    )
    shear = u[:, 2] * cfg.max_shear
    cos, sin = torch.cos(angle), torch.sin(angle)
    # grid_sample maps output to input coordinates: the inverse of rotate·shear·scale.
    forward = (
        torch.stack(
            [torch.stack([cos, cos * shear - sin], 1), torch.stack([sin, sin * shear + cos], 1)], 1
        )
        * scale[:, None, None]
    )
    inverse = torch.linalg.inv(forward)
    shift = torch.stack([u[:, 3], u[:, 4]], 1) * cfg.max_shift * 2
    theta = torch.cat([inverse, -(inverse @ shift[:, :, None])], 2).to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - BACKGROUND, grid, align_corners=False) + BACKGROUND


def _strokes(x: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    """Thicker strokes (a 3×3 max: ink is bright) or thinner ones (a 3×3 min) for `share`
    of the images, half each."""
    thicker = F.max_pool2d(x, 3, stride=1, padding=1)
    thinner = -F.max_pool2d(-x, 3, stride=1, padding=1)
    pick = _uniform(x, gen)
    x = _where(pick < share / 2, thicker, x)
    return _where((pick >= share / 2) & (pick < share), thinner, x)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """A Gaussian blur of radius about one pixel (3×3 binomial kernel)."""
    k = torch.tensor([1.0, 2.0, 1.0], device=x.device)
    kernel = (k[:, None] * k[None, :] / 16).view(1, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), value=BACKGROUND), kernel)


def _coarse(x: torch.Tensor) -> torch.Tensor:
    """Seen at half the resolution, as a coarse scan is."""
    return F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")
