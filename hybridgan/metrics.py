"""Inpainting quality inside the hole: one implementation for training-time validation and evaluate.

Every metric is computed per image on images in [-1, 1] mapped to [0, 1], and only where the
generator worked:

- `psnr`, `ssim`, `sharpness` on the crop of the hole's bounding box (the centre hole's box is the
  hole itself). The box is grown to at least `SSIM_WINDOW` pixels a side so that SSIM's Gaussian
  window fits; identical crops give PSNR = `PSNR_CEILING` (100 dB, instead of inf) and SSIM = 1.
- `l1`, `l2`: mean absolute / squared error over the hole's pixels only (all channels), on the
  [0, 1] scale, so that for a box hole `psnr == -10 * log10(l2)`.
- `sharpness`: variance of the Laplacian of the filled crop over that of the original crop
  (grayscale, valid convolution so the box edges do not count). Below 1 means the fill is blurrier
  than the face it replaces; identical crops give exactly 1.

Under Accelerate, compute per-image values on each rank, gather them, and accumulate on the main
process::

    values = hole_metrics(filled, images, masks)
    tracker.add(accelerator.gather_for_metrics(values))
    ...
    summary = tracker.compute()   # {"psnr": ..., "ssim": ..., ..., "n": images}
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

PSNR_CEILING = 100.0
SSIM_WINDOW = 11
_EPS = 1e-12
_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
_LUMA = torch.tensor([0.299, 0.587, 0.114])

Box = tuple[int, int, int, int]  # top, left, height, width


def to_unit(images: Tensor) -> Tensor:
    """[-1, 1] images to [0, 1], clamped."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def hole_box(mask: Tensor, min_side: int = SSIM_WINDOW) -> Box:
    """Bounding box (top, left, height, width) of one [1, S, S] mask's hole, grown to `min_side`.

    An empty mask gives the whole image.
    """
    size_h, size_w = mask.shape[-2:]
    rows = torch.nonzero(mask.reshape(size_h, size_w).amax(dim=1) > 0.5).flatten()
    cols = torch.nonzero(mask.reshape(size_h, size_w).amax(dim=0) > 0.5).flatten()
    if rows.numel() == 0:
        return 0, 0, size_h, size_w
    top, height = _grow(int(rows[0]), int(rows[-1]) + 1, min_side, size_h)
    left, width = _grow(int(cols[0]), int(cols[-1]) + 1, min_side, size_w)
    return top, left, height, width


def _grow(start: int, stop: int, min_side: int, limit: int) -> tuple[int, int]:
    """Widen [start, stop) around its centre to at least `min_side`, kept inside [0, limit)."""
    side = max(stop - start, min(min_side, limit))
    start = min(max(0, (start + stop - side) // 2), limit - side)
    return start, side


def _per_box(fn: Callable[[Tensor, Tensor], Tensor], pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """fn(pred_crops, target_crops) -> [n] on [0, 1] crops, run once per distinct hole box."""
    groups: dict[Box, list[int]] = defaultdict(list)
    for index in range(mask.shape[0]):
        groups[hole_box(mask[index])].append(index)
    out = torch.empty(mask.shape[0], dtype=torch.float32, device=pred.device)
    pred, target = to_unit(pred), to_unit(target)
    for (top, left, height, width), indices in groups.items():
        idx = torch.tensor(indices, device=pred.device)
        crop = (slice(None), slice(None), slice(top, top + height), slice(left, left + width))
        out[idx] = fn(pred[idx][crop], target[idx][crop]).float()
    return out


def _psnr(pred: Tensor, target: Tensor) -> Tensor:
    value = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return value.clamp(max=PSNR_CEILING).nan_to_num(PSNR_CEILING)


def _ssim(pred: Tensor, target: Tensor) -> Tensor:
    window = min(SSIM_WINDOW, *pred.shape[-2:])
    window -= 1 - window % 2  # odd, as the Gaussian window must be
    return structural_similarity_index_measure(
        pred, target, data_range=1.0, kernel_size=window, reduction="none"
    )


def laplacian_variance(images: Tensor) -> Tensor:
    """Per-image variance of the Laplacian of the grayscale of [n, 3, h, w] images (valid conv)."""
    gray = (images * _LUMA.to(images).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    response = F.conv2d(gray, _LAPLACIAN.to(images).view(1, 1, 3, 3))
    return response.flatten(1).var(dim=1, unbiased=False)


def _sharpness(pred: Tensor, target: Tensor) -> Tensor:
    return (laplacian_variance(pred) + _EPS) / (laplacian_variance(target) + _EPS)


def _masked_mean(error: Tensor, mask: Tensor) -> Tensor:
    """Mean of [B, C, S, S] `error` over the hole pixels of each image (all channels)."""
    weight = mask.expand_as(error).float()
    return (error * weight).flatten(1).sum(dim=1) / weight.flatten(1).sum(dim=1).clamp(min=1.0)


def psnr(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-image PSNR (dB, data range 1) on the hole's box; capped at PSNR_CEILING."""
    return _per_box(_psnr, pred, target, mask)


def ssim(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5) on the hole's box."""
    return _per_box(_ssim, pred, target, mask)


def sharpness(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-image Laplacian-variance ratio filled / original on the hole's box."""
    return _per_box(_sharpness, pred, target, mask)


def l1(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-image mean |pred - target| over the hole, [0, 1] scale."""
    return _masked_mean((to_unit(pred) - to_unit(target)).abs(), mask)


def l2(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-image mean (pred - target)^2 over the hole, [0, 1] scale."""
    return _masked_mean((to_unit(pred) - to_unit(target)).square(), mask)


METRICS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "psnr": psnr,
    "ssim": ssim,
    "l1": l1,
    "l2": l2,
    "sharpness": sharpness,
}


@torch.no_grad()
def hole_metrics(pred: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Every metric of METRICS as a per-image [B] tensor; pred/target [B,3,S,S] in [-1,1], mask [B,1,S,S]."""
    if pred.shape != target.shape or mask.shape[0] != pred.shape[0] or mask.shape[-2:] != pred.shape[-2:]:
        raise ValueError(f"shapes do not match: pred {tuple(pred.shape)}, target "
                         f"{tuple(target.shape)}, mask {tuple(mask.shape)}")
    pred, target, mask = pred.detach().float(), target.detach().float(), mask.detach().float()
    return {name: fn(pred, target, mask) for name, fn in METRICS.items()}


def mean_fill(masked: Tensor, mask: Tensor) -> Tensor:
    """The trivial baseline: each image's hole filled with the mean colour of its known pixels."""
    known = 1.0 - mask
    mean = (masked * known).sum(dim=(2, 3), keepdim=True) / known.sum(dim=(2, 3), keepdim=True).clamp(min=1.0)
    return masked * known + mean * mask


class HoleMetrics:
    """Accumulates per-image metric values (already gathered across ranks) and averages them."""

    def __init__(self) -> None:
        self._values: dict[str, list[Tensor]] = defaultdict(list)

    def add(self, values: dict[str, Tensor]) -> None:
        """Append per-image values, e.g. `accelerator.gather_for_metrics(hole_metrics(...))`."""
        for name, value in values.items():
            self._values[name].append(value.detach().float().flatten().cpu())

    def update(self, pred: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Compute and add one batch's values (single process); returns them."""
        values = hole_metrics(pred, target, mask)
        self.add(values)
        return values

    def per_image(self) -> dict[str, Tensor]:
        """All values so far, one flat tensor per metric (every METRICS name, empty before any add)."""
        names = list(METRICS) + [name for name in self._values if name not in METRICS]
        return {name: torch.cat(self._values[name]) if self._values.get(name) else torch.empty(0)
                for name in names}

    def compute(self) -> dict[str, float]:
        """Mean of each metric over all images so far (NaN before any), plus `n`, the number of images."""
        values = self.per_image()
        summary = {name: float(value.mean()) if value.numel() else math.nan for name, value in values.items()}
        summary["n"] = int(values["psnr"].numel())
        return summary
