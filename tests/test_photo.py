"""`hybridgan.data.photo`: every kind of photo file becomes the right 8-bit RGB pixels, upright."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from hybridgan.data.photo import EXIF_ORIENTATION, PhotoError, is_photo_name, is_plain_frame, open_photo, square_frame

RED, BLUE = (220, 30, 30), (30, 30, 220)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def upright_red_over_blue(width: int, height: int) -> Image.Image:
    """Top half red, bottom half blue: sideways storage turns it into left/right halves."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width, height // 2))
    return image


def rotated_jpeg(upright: Image.Image) -> bytes:
    """A JPEG stored as a phone stores it: pixels turned, EXIF orientation 6 (turn 90 degrees clockwise)."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return encode(stored, "JPEG", quality=95, exif=exif)


def assert_close(pixel, expected, tolerance: int = 6) -> None:
    assert all(abs(int(a) - b) <= tolerance for a, b in zip(pixel, expected)), (pixel, expected)


def test_16_bit_png_keeps_its_grey_level() -> None:
    grey16 = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # 32896 / 257 = 128
    data = encode(grey16, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really stored with 16 bits
    pixels = np.asarray(open_photo(data, "grey16.png"))
    assert pixels.shape == (8, 8, 3) and (pixels == 128).all()
    white = np.asarray(open_photo(encode(Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)), "PNG"), "w"))
    assert (white == 255).all()


def test_exif_orientation_is_applied() -> None:
    photo = open_photo(rotated_jpeg(upright_red_over_blue(120, 200)), "phone.jpg")
    assert photo.size == (120, 200)
    assert_close(photo.getpixel((60, 20)), RED)
    assert_close(photo.getpixel((60, 180)), BLUE)


def test_plain_frame_is_an_upright_rgb_jpeg_of_the_size() -> None:
    face = upright_red_over_blue(64, 64)
    assert is_plain_frame(encode(face, "JPEG"), 64)
    assert not is_plain_frame(encode(face, "JPEG"), 32)
    assert not is_plain_frame(rotated_jpeg(face), 64)
    assert not is_plain_frame(encode(face, "PNG"), 64)
    assert not is_plain_frame(encode(face.convert("CMYK"), "JPEG"), 64)


@pytest.mark.parametrize("fmt, mode, params", [
    ("GIF", "P", {}), ("WEBP", "RGB", {"lossless": True}), ("TIFF", "RGB", {}), ("BMP", "RGB", {}),
    ("PNG", "P", {}), ("JPEG", "CMYK", {"quality": 100}), ("TIFF", "CMYK", {}),
])
def test_formats_and_modes_give_their_colour(fmt: str, mode: str, params: dict) -> None:
    colour = (200, 120, 40)
    image = Image.new("RGB", (16, 12), colour).convert(mode)
    photo = open_photo(encode(image, fmt, **params), f"x.{fmt.lower()}")
    assert photo.mode == "RGB" and photo.size == (16, 12)
    assert_close(np.asarray(photo).reshape(-1, 3).mean(0), colour, tolerance=4)


def test_transparency_is_composited_over_white() -> None:
    rgba = Image.new("RGBA", (10, 10), (0, 255, 0, 0))  # green hidden under full transparency
    rgba.paste((200, 0, 0, 255), (0, 0, 5, 10))
    photo = open_photo(encode(rgba, "PNG"), "alpha.png")
    assert photo.getpixel((2, 5)) == (200, 0, 0) and photo.getpixel((7, 5)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 255, 0, 10, 20, 30] + [0] * 762)
    palette.info["transparency"] = 0
    palette.putpixel((0, 0), 0)
    photo = open_photo(encode(palette, "PNG", transparency=0), "p.png")
    assert photo.getpixel((0, 0)) == (255, 255, 255) and photo.getpixel((3, 3)) == (10, 20, 30)


def test_unreadable_data_names_the_file() -> None:
    with pytest.raises(PhotoError, match=r"^a/b\.png: not a readable image") as err:
        open_photo(b"not an image at all", "a/b.png")
    assert str(err.value) == "a/b.png: not a readable image (UnidentifiedImageError: cannot identify image file)"
    truncated = encode(upright_red_over_blue(64, 64), "JPEG")[:300]
    with pytest.raises(PhotoError, match="cut.jpg: not a readable image"):
        open_photo(truncated, "cut.jpg")


def test_names_and_square_frame() -> None:
    assert is_photo_name("a/B.JPG") and is_photo_name("x.webp") and is_photo_name("y.tiff")
    assert not is_photo_name("notes.txt") and not is_photo_name("jpg") and not is_photo_name("a.jpg/readme")
    frame = square_frame(upright_red_over_blue(100, 300), 50)  # keeps rows 100..200 of 300
    assert frame.size == (50, 50)
    assert_close(frame.getpixel((25, 10)), RED)
    assert_close(frame.getpixel((25, 40)), BLUE)
