"""The pretraining corruption: Gaussian-blur one square of the 256x256 source frame (docs/paper.md says why
the square lives in the 256 frame: the paper's (80, 80) corner and 64-80 side do not fit a 128 image).

The square's top-left corner is `(blur.top_left, blur.top_left)` (or, with `blur.random_position`,
drawn uniformly so that the square lies in the frame), its side an integer drawn from
`[blur.min_side, blur.max_side]`, and the Gaussian's variance is drawn uniformly from
`[blur.min_variance, blur.max_variance]` (sigma = sqrt(variance)); with `blur.schedule_epochs`,
training's first epochs draw from a stronger range that moves to that one (`variance_range`), a
curriculum that lets a from-scratch D find blur before it must find the paper's faint blur. The blur is an exact, separable,
normalised Gaussian kernel of radius ceil(3 sigma) with reflect padding, computed over the square plus
that radius of context (equal to blurring the whole image), and only the square is pasted back.
"""

from __future__ import annotations

import math

import numpy as np

from hybridgan.config import BlurConfig

Box = tuple[int, int, int]  # (top, left, side) in pixels


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The normalised 1-D Gaussian of standard deviation `sigma` on [-ceil(3 sigma), ceil(3 sigma)]."""
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    return (kernel / kernel.sum()).astype(np.float32)


def _convolve(array: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """`array` convolved with `kernel` along `axis`, trimmed to 'valid' (shrinks by len-1)."""
    n = array.shape[axis] - len(kernel) + 1
    out = np.zeros(array.shape[:axis] + (n,) + array.shape[axis + 1:], dtype=np.float32)
    window = [slice(None)] * array.ndim
    for i, weight in enumerate(kernel):
        window[axis] = slice(i, i + n)
        out += weight * array[tuple(window)]
    return out


def gaussian_blur_region(image: np.ndarray, box: Box, sigma: float) -> np.ndarray:
    """The blurred pixels of `box` in `image` (HxWxC uint8), as uint8 [side, side, C]."""
    top, left, side = box
    kernel = gaussian_kernel(sigma)
    radius = len(kernel) // 2
    height, width = image.shape[:2]
    # Context of `radius` pixels around the square; reflect-pad only where it leaves the image.
    y0, y1 = max(0, top - radius), min(height, top + side + radius)
    x0, x1 = max(0, left - radius), min(width, left + side + radius)
    pads = ((radius - (top - y0), radius - (y1 - top - side)),
            (radius - (left - x0), radius - (x1 - left - side)), (0, 0))
    region = np.pad(image[y0:y1, x0:x1].astype(np.float32), pads, mode="reflect")
    blurred = _convolve(_convolve(region, kernel, 0), kernel, 1)
    return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


def variance_range(cfg: BlurConfig, epoch: int | None) -> tuple[float, float]:
    """The variance range of a training `epoch` (0-based) under the blur schedule: from the
    `start_*` range at epoch 0 linearly to [min_variance, max_variance] at `schedule_epochs` and
    after. `epoch=None` (evaluation) and no schedule give the final range."""
    final = (cfg.min_variance, cfg.max_variance)
    if epoch is None or cfg.schedule_epochs <= 0 or epoch >= cfg.schedule_epochs:
        return final
    t = epoch / cfg.schedule_epochs
    start = (cfg.start_min_variance, cfg.start_max_variance)
    return (start[0] + t * (final[0] - start[0]), start[1] + t * (final[1] - start[1]))


def draw_square(rng: np.random.Generator, cfg: BlurConfig, height: int, width: int,
                epoch: int | None = None) -> tuple[Box, float]:
    """The square (top, left, side) and the Gaussian's variance for one image, drawn from `rng`
    (side, then variance from `variance_range(cfg, epoch)`, then the corner when `cfg.random_position`)."""
    side = int(rng.integers(cfg.min_side, cfg.max_side + 1))
    variance = float(rng.uniform(*variance_range(cfg, epoch)))
    top = left = cfg.top_left
    if cfg.random_position and side <= min(height, width):
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    if top + side > height or left + side > width:
        raise ValueError(f"blur square at {top},{left} of side {side} leaves the {height}x{width} image")
    return (top, left, side), variance


def blur_in(image: np.ndarray, box: Box, variance: float) -> np.ndarray:
    """A copy of `image` (HxWx3 uint8) with `box` blurred by a Gaussian of `variance`."""
    top, left, side = box
    blurred = image.copy()
    if variance > 0:
        blurred[top:top + side, left:left + side] = gaussian_blur_region(image, box, math.sqrt(variance))
    return blurred


def blur_square(image: np.ndarray, rng: np.random.Generator, cfg: BlurConfig) -> tuple[np.ndarray, Box]:
    """`image` (HxWx3 uint8, the source frame) with one square blurred; also the square's box."""
    box, variance = draw_square(rng, cfg, image.shape[0], image.shape[1])
    return blur_in(image, box, variance), box


def blur_target(size: int, box: Box) -> np.ndarray:
    """The per-pixel target of the U-Net head: float32 [size, size], 0 inside `box`, 1 elsewhere."""
    top, left, side = box
    target = np.ones((size, size), dtype=np.float32)
    target[top:top + side, left:left + side] = 0.0
    return target
