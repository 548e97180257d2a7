"""Built-in synthetic faces: a CelebA-HQ stand-in for the CPU smoke path and the tests.

Each face is a pure function of `(index, seed)`: hair, an oval face, brows, eyes with irises and
pupils, a nose and a mouth, with a varied skin tone, a small pose change (rotation and offset), a
lighting gradient and a background colour. The layout follows aligned CelebA-HQ: in the 256 frame
the eyes sit near y=112 and the nose between y=120 and y=160, so the central 128x128 square (the
64x64 hole after resizing to 128) holds eyes and nose, as in the paper's set-up.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

FRAME = 256
_SKIN = np.array([[255, 224, 196], [241, 194, 160], [224, 172, 125], [198, 134, 90],
                  [141, 85, 54], [96, 60, 40]], dtype=np.float64)
_HAIR = np.array([[20, 16, 14], [60, 40, 25], [110, 75, 40], [200, 160, 90],
                  [150, 60, 30], [130, 130, 130]], dtype=np.float64)
_IRIS = np.array([[70, 45, 25], [40, 90, 150], [60, 110, 60], [110, 90, 60]], dtype=np.float64)


def _rng(index: int, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"synthetic-face:{seed}:{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _mix(palette: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """A colour between two neighbouring palette entries, so tones vary continuously."""
    i = rng.integers(0, len(palette) - 1)
    t = rng.uniform()
    colour = (1 - t) * palette[i] + t * palette[i + 1]
    return tuple(int(c) for c in colour)  # type: ignore[return-value]


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c * factor))) for c in colour)  # type: ignore[return-value]


def _draw_eye(draw: ImageDraw.ImageDraw, cx: float, cy: float, rng_vals: dict, skin: tuple) -> None:
    w, h, iris, look = rng_vals["eye_w"], rng_vals["eye_h"], rng_vals["iris"], rng_vals["look"]
    draw.ellipse((cx - w, cy - h - 2, cx + w, cy + h + 1), fill=_shade(skin, 0.8))
    draw.ellipse((cx - w, cy - h, cx + w, cy + h), fill=(245, 245, 240))
    r = h * 0.95
    ix = cx + look
    draw.ellipse((ix - r, cy - r, ix + r, cy + r), fill=iris)
    draw.ellipse((ix - r * 0.45, cy - r * 0.45, ix + r * 0.45, cy + r * 0.45), fill=(10, 10, 10))
    draw.ellipse((ix + r * 0.2, cy - r * 0.5, ix + r * 0.5, cy - r * 0.2), fill=(250, 250, 250))


def _draw_face(draw: ImageDraw.ImageDraw, rng: np.random.Generator, cx: float, cy: float) -> None:
    skin, hair = _mix(_SKIN, rng), _mix(_HAIR, rng)
    fw, fh = rng.uniform(52, 62), rng.uniform(74, 84)
    hair_len = rng.uniform(0, 70)
    # Hair: a cap behind the head plus (for long hair) a back part down to the shoulders.
    draw.ellipse((cx - fw - 10, cy - fh - 16, cx + fw + 10, cy + fh * 0.4), fill=hair)
    if hair_len > 25:
        draw.rectangle((cx - fw - 10, cy - 20, cx + fw + 10, cy + fh * 0.4 + hair_len), fill=hair)
    neck = _shade(skin, 0.85)
    draw.rectangle((cx - fw * 0.45, cy + fh * 0.6, cx + fw * 0.45, FRAME), fill=neck)
    draw.ellipse((cx - fw, cy - fh, cx + fw, cy + fh), fill=skin)
    # Fringe over the forehead.
    draw.chord((cx - fw - 4, cy - fh - 8, cx + fw + 4, cy - fh * 0.2), 180, 360, fill=hair)
    ears_y = cy - 5
    for side in (-1, 1):
        ex = cx + side * fw
        draw.ellipse((ex - 8, ears_y - 14, ex + 8, ears_y + 14), fill=_shade(skin, 0.92))
    eye_y, gap = cy - 20 + rng.uniform(-3, 3), rng.uniform(24, 30)
    eye = {"eye_w": rng.uniform(10, 14), "eye_h": rng.uniform(5, 7.5), "iris": _mix(_IRIS, rng),
           "look": rng.uniform(-3, 3)}
    brow_lift, brow_tilt = rng.uniform(11, 16), rng.uniform(-3, 3)
    for side in (-1, 1):
        ex = cx + side * gap
        _draw_eye(draw, ex, eye_y, eye, skin)
        by = eye_y - brow_lift
        draw.line((ex - 13, by + side * brow_tilt * -1, ex + 13, by + side * brow_tilt),
                  fill=_shade(hair, 0.8), width=int(rng.uniform(3, 6)))
    nose_len, nose_w = rng.uniform(26, 36), rng.uniform(7, 11)
    top, tip = eye_y + 4, eye_y + 4 + nose_len
    draw.polygon([(cx, top), (cx - nose_w, tip), (cx + nose_w, tip)], fill=_shade(skin, 0.88))
    draw.line((cx + 2, top + 2, cx + 4, tip - 3), fill=_shade(skin, 1.08), width=2)
    for side in (-1, 1):
        draw.ellipse((cx + side * 5 - 3, tip - 3, cx + side * 5 + 3, tip + 1), fill=_shade(skin, 0.45))
    mouth_y, mouth_w = tip + rng.uniform(14, 20), rng.uniform(16, 24)
    lips = _shade((200, 90, 90), rng.uniform(0.7, 1.1))
    smile = rng.uniform(0, 10)
    draw.chord((cx - mouth_w, mouth_y - 6, cx + mouth_w, mouth_y + 4 + smile), 0, 180, fill=lips)
    draw.line((cx - mouth_w, mouth_y, cx + mouth_w, mouth_y), fill=_shade(lips, 0.5), width=2)


def _light(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Multiply by a linear brightness gradient (about 1 +- 0.35) in a random direction."""
    angle, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.35)
    ramp = np.linspace(-strength, strength, FRAME, dtype=np.float32)
    field = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    # Fixed point (x128) in uint16 is several times faster than float and exact enough for a gradient.
    factor = ((1.0 + field) * 128).astype(np.uint16)[:, :, None]
    lit = (np.asarray(image, dtype=np.uint16) * factor) >> 7
    return Image.fromarray(np.minimum(lit, 255).astype(np.uint8))


def _texture(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Fine grain, like skin pores and sensor noise: what a blur removes first, as in real photos.

    Two scales of noise (per pixel and per 2x2 block) so that some of it survives the resize to
    64 or 128 that the loader applies.
    """
    amplitude = rng.uniform(5.0, 9.0)
    fine = rng.normal(0.0, 1.0, (FRAME, FRAME, 1))
    coarse = np.kron(rng.normal(0.0, 1.0, (FRAME // 2, FRAME // 2, 1)), np.ones((2, 2, 1)))
    grain = amplitude * (0.5 * fine + coarse)
    pixels = np.asarray(image, dtype=np.float32) + grain.astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def synthetic_face(index: int, seed: int = 0, size: int = FRAME) -> Image.Image:
    """The synthetic face number `index` for `seed`: a deterministic RGB image of `size` x `size`."""
    rng = _rng(index, seed)
    background = _mix(np.array([[40, 60, 90], [120, 130, 140], [200, 200, 190], [90, 120, 80],
                                [160, 110, 120]], dtype=np.float64), rng)
    image = Image.new("RGB", (FRAME, FRAME), background)
    draw = ImageDraw.Draw(image)
    cx, cy = FRAME / 2 + rng.uniform(-6, 6), FRAME / 2 + 4 + rng.uniform(-6, 6)
    _draw_face(draw, rng, cx, cy)
    image = image.rotate(rng.uniform(-8, 8), resample=Image.BILINEAR, center=(cx, cy),
                         fillcolor=background)
    image = image.filter(ImageFilter.BoxBlur(1))
    image = _texture(_light(image, rng), rng)
    if size != FRAME:
        image = image.resize((size, size), Image.BICUBIC)
    return image
