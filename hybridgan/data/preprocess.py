"""From a stored face frame to the pixels a model sees: the one function training and evaluation share.

The pack stores each face as a square frame (`pack.source_size`, 256). The models see
`data.image_size` pixels of a square crop of side `data.crop_fraction` x frame: a random crop (and
optional flip) in training, the centred crop everywhere else, so that faces have the same scale in
training, validation, evaluation and inpainting.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]


def crop_side(frame: int, crop_fraction: float) -> int:
    """Side of the square crop of a `frame`-pixel frame: round(frame * crop_fraction)."""
    return round(frame * crop_fraction)


def crop_box(frame: int, crop_fraction: float, rng: np.random.Generator | None = None) -> Box:
    """(left, top, right, bottom) of the square crop: at a random offset drawn from `rng`, or centred."""
    side = crop_side(frame, crop_fraction)
    if rng is None:
        top = left = (frame - side) // 2
    else:
        top, left = (int(v) for v in rng.integers(0, frame - side + 1, size=2))
    return (left, top, left + side, top + side)


def face_pixels(image: Image.Image, size: int, box: Box, flip: bool = False,
                resample: int = Image.BILINEAR) -> np.ndarray:
    """The `box` of `image` resized (antialiased) to `size` x `size`, mirrored when `flip`: uint8 [S, S, C]."""
    out = image.resize((size, size), resample, box=box)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def eval_face(image: Image.Image, size: int, crop_fraction: float) -> np.ndarray:
    """The evaluation view of a square frame: the centred crop, no flip; uint8 [size, size, 3]."""
    return face_pixels(image.convert("RGB"), size, crop_box(image.size[0], crop_fraction))
