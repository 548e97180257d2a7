"""Holes for the generator to fill, as float masks [B, 1, S, S] with 1.0 = missing, 0.0 = known.

`mask.kind`: `center` is the paper's central `hole_size` square (same for every image);
`random_box` a square of side in [min_box, max_box] at a uniform position; `strokes` free-form
thick poly-lines (`strokes` of them, `stroke_width` pixels wide, four segments each). Randomness comes
only from the optional `torch.Generator`, so a seeded generator gives the same masks every time; the
masks are made on the generator's device (a CUDA generator makes them on the GPU, no host work).
"""

from __future__ import annotations

import math

import torch

from hybridgan.config import MaskConfig

_SEGMENTS = 4


def center_box(image_size: int, hole_size: int) -> tuple[int, int, int]:
    """(top, left, size) of the central `hole_size` square in an `image_size` frame."""
    offset = (image_size - hole_size) // 2
    return offset, offset, hole_size


def apply_mask(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The masked input: known pixels kept, the hole set to 0 (mid-grey in [-1, 1])."""
    return image * (1 - mask)


def _device(generator: torch.Generator | None) -> torch.device | None:
    return None if generator is None else generator.device


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=_device(generator))


def _center(cfg: MaskConfig, size: int, batch: int) -> torch.Tensor:
    top, left, hole = center_box(size, cfg.hole_size)
    masks = torch.zeros(batch, 1, size, size)
    masks[:, :, top:top + hole, left:left + hole] = 1.0
    return masks


def _random_box(cfg: MaskConfig, size: int, batch: int, generator: torch.Generator | None) -> torch.Tensor:
    sides = torch.randint(cfg.min_box, cfg.max_box + 1, (batch,), generator=generator, device=_device(generator))
    tops = (_uniform((batch,), generator) * (size - sides + 1)).long()
    lefts = (_uniform((batch,), generator) * (size - sides + 1)).long()
    coords = torch.arange(size, device=_device(generator))
    rows = (coords[None, :] >= tops[:, None]) & (coords[None, :] < (tops + sides)[:, None])
    cols = (coords[None, :] >= lefts[:, None]) & (coords[None, :] < (lefts + sides)[:, None])
    return (rows[:, :, None] & cols[:, None, :]).float().unsqueeze(1)


def _strokes(cfg: MaskConfig, size: int, batch: int, generator: torch.Generator | None) -> torch.Tensor:
    """Each stroke: a random start, then segments of random direction and length, clamped to the frame;
    a pixel is in the hole when its centre lies within stroke_width/2 of any segment."""
    n = cfg.strokes
    start = _uniform((batch, n, 1, 2), generator) * size
    angles = _uniform((batch, n, _SEGMENTS, 1), generator) * 2 * math.pi
    lengths = (0.1 + 0.25 * _uniform((batch, n, _SEGMENTS, 1), generator)) * size
    steps = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1) * lengths
    points = (start + torch.cumsum(torch.cat([torch.zeros_like(start), steps], dim=2), dim=2)).clamp(0, size)
    a = points[:, :, :-1].reshape(batch, -1, 1, 2)
    b = points[:, :, 1:].reshape(batch, -1, 1, 2)
    coords = torch.arange(size, device=_device(generator)) + 0.5
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    pixels = torch.stack([xs, ys], dim=-1).reshape(1, 1, -1, 2)
    ab, ap = b - a, pixels - a
    t = ((ap * ab).sum(-1, keepdim=True) / (ab * ab).sum(-1, keepdim=True).clamp_min(1e-6)).clamp(0, 1)
    distance = (ap - t * ab).norm(dim=-1).amin(dim=1)
    return (distance <= cfg.stroke_width / 2).float().reshape(batch, 1, size, size)


def make_masks(cfg: MaskConfig, image_size: int, batch: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """`batch` masks of `cfg.kind` for `image_size` images: float [batch, 1, S, S], 1.0 = hole."""
    if cfg.kind == "center":
        return _center(cfg, image_size, batch)
    if cfg.kind == "random_box":
        return _random_box(cfg, image_size, batch, generator)
    if cfg.kind == "strokes":
        return _strokes(cfg, image_size, batch, generator)
    raise ValueError(f"mask.kind={cfg.kind!r} is not one of center, random_box, strokes")
