"""A photo file as the pack stores it: 8-bit RGB the right way up, cut to the centred square frame.

Shared by `pack` (sources into shards) and by the commands that read a folder of photos directly
(`evaluate`, `inpaint`), so that a face looks the same whichever way it comes in.

Every format Pillow reads is accepted (`PHOTO_SUFFIXES`). How each kind becomes 8-bit RGB:

- EXIF orientation (phone photos) is applied first, so the face is stored upright.
- 16-bit greyscale (PNG, TIFF: Pillow's `I;16*` and `I` modes) is scaled by 255/65535; a plain
  `convert("RGB")` would clip every value above 255 to white. 32-bit float greyscale (`F`) is taken
  as [0, 1] when its maximum is at most 1, else as [0, 255]. 16-bit RGB PNGs are reduced to their
  high byte by Pillow's decoder.
- Transparency (RGBA, LA, a palette with a transparent colour) is composited over white, the way
  a browser or photo viewer shows it; the colour hidden under transparent pixels is not used.
- Palette (GIF, PNG-8), CMYK (JPEG, TIFF), YCbCr, LAB and 1-bit images go through Pillow's own
  conversion to RGB (no ICC colour management).
- Animated or multi-page files (GIF, WebP, TIFF) give their first frame.
"""

from __future__ import annotations

import io
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, ImageOps

HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
EXIF_ORIENTATION = 0x0112
BACKGROUND = (255, 255, 255)


def _readable_suffixes() -> frozenset[str]:
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


PHOTO_SUFFIXES = _readable_suffixes()
"""Lower-case file suffixes of every format this Pillow can open (.jpg, .png, .gif, .webp, .tif ...)."""


class PhotoError(ValueError):
    """A file Pillow cannot read as a photo; the message names the file."""


def is_photo_name(name: str) -> bool:
    """Whether a file name has the suffix of a format Pillow reads (case-insensitive)."""
    return PurePosixPath(name).suffix.lower() in PHOTO_SUFFIXES


def _to_8bit(image: Image.Image) -> Image.Image:
    """High bit-depth greyscale scaled (not clipped) to 8-bit "L"."""
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if pixels.size and np.nanmax(pixels) <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0
    return Image.fromarray(np.clip(np.nan_to_num(pixels) * scale + 0.5, 0, 255).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in HIGH_BIT_MODES or image.mode == "F":
        image = _to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        canvas = Image.new("RGB", image.size, BACKGROUND)
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image.convert("RGB")


def open_photo(data: bytes, name: str) -> Image.Image:
    """Decode `data` fully into 8-bit RGB with its EXIF orientation applied (PhotoError naming `name`).

    See the module docstring for how each kind of file is converted.
    """
    buffer = io.BytesIO(data)
    try:
        with Image.open(buffer) as image:
            image.load()  # decodes fully: truncated or corrupt files fail here
            return _to_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, Image.DecompressionBombError) as err:
        reason = str(err).replace(f" {buffer!r}", "")  # Pillow would name the file by the buffer's repr
        raise PhotoError(f"{name}: not a readable image ({type(err).__name__}: {reason})") from None


def is_plain_frame(data: bytes, size: int) -> bool:
    """Whether `data` is already what the pack stores: an upright 8-bit RGB JPEG of `size` x `size`.

    Reads the header only; such a file can be stored byte for byte (after `open_photo` checked it).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            return (image.format == "JPEG" and image.mode == "RGB" and image.size == (size, size)
                    and image.getexif().get(EXIF_ORIENTATION, 1) == 1)
    except (OSError, SyntaxError, ValueError):
        return False


def square_frame(image: Image.Image, size: int) -> Image.Image:
    """The centred square of side min(W, H), resized (Lanczos) to `size` x `size`."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.resize((size, size), Image.LANCZOS, box=(left, top, left + side, top + side), reducing_gap=3.0)
