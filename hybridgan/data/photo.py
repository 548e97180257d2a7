"""A photo file as the pack stores it: 8-bit RGB the right way up, cut to the centred square frame.

Shared by `pack` (sources into shards) and by the commands that read a folder of photos directly
(`evaluate`, `inpaint`), so that a face looks the same whichever way it comes in.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class PhotoError(ValueError):
    """A file Pillow cannot read as a photo; the message names the file."""


def open_photo(data: bytes, name: str) -> Image.Image:
    """Decode `data` fully into 8-bit RGB with its EXIF orientation applied (PhotoError naming `name`).

    16-bit greyscale is scaled to 8 bits (a plain `convert("RGB")` clips it to white); palette and
    alpha images are converted to RGB.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in HIGH_BIT_MODES:
                pixels = np.asarray(image, dtype=np.float64)
                image = Image.fromarray(np.clip(pixels / 257.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise PhotoError(f"{name}: not a readable image ({err})") from None


def square_frame(image: Image.Image, size: int) -> Image.Image:
    """The centred square of side min(W, H), resized (Lanczos) to `size` x `size`."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.resize((size, size), Image.LANCZOS, box=(left, top, left + side, top + side), reducing_gap=3.0)
