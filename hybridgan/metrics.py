"""Inpainting quality inside the hole: one implementation for training-time validation and evaluate.

Every metric is computed per image on images in [-1, 1] mapped to [0, 1], and only where the
generator worked:

- `psnr`, `ssim`, `sharpness` on the crop of the hole's bounding box (the centre hole's box is the
  hole itself). The box is grown to at least `SSIM_WINDOW` pixels a side so that SSIM's Gaussian
  window fits; identical crops give PSNR = `PSNR_CEILING` (100 dB, instead of inf) and SSIM = 1.
  A fill holding NaN or an infinity (a diverged generator) is a `MetricError`, never a score: no
  metric is ever clamped from NaN into a value.
- `l1`, `l2`: mean absolute / squared error over the hole's pixels only (all channels), on the
  [0, 1] scale, so that for a box hole `psnr == -10 * log10(l2)`.
- `sharpness`: variance of the Laplacian of the filled crop over that of the original crop
  (grayscale, valid convolution so the box edges do not count). Below 1 means the fill is blurrier
  than the face it replaces; identical crops give exactly 1. Noise or a checkerboard raise it too,
  so it cannot tell detail from artefacts; `detail` can.
- `detail`: the part of the original's fine detail the fill reproduces: the Laplacians (high-pass)
  of the grayscale crops, h_fill and h_orig, give sum(h_fill * h_orig) / sum(h_orig ** 2). An exact
  fill gives 1, a blurred one less (a Gaussian blur scales every detail down), a flat one 0. Noise
  and a checkerboard are uncorrelated with the original, so adding them leaves it unchanged on
  average: it cannot be fooled by them. It rewards detail in the right place; a sharp but different
  texture scores like a blur, so it measures recovered detail, not plausibility.
- `edge_jump`: the seam. Mean absolute step (0-255, all channels) between each hole pixel on the
  hole's border and its 4-neighbour just outside, the outside taken from the original (the known
  pixels a composited fill keeps). `edge_jump_ref` is the same step in the original, the natural
  edge contrast a seamless fill would match; a hard seam makes edge_jump several times larger.
- `checkerboard`: RMS amplitude (0-255) of the filled crop's grayscale at the period-2 frequencies
  a stride-2 up-convolution leaves, through filters with response 1 there and 0 at zero frequency
  and on ramps (`period2_amplitude`). A +-A checkerboard or stripe pattern gives A; smooth content
  about 0; white noise of grey standard deviation s about 0.65 s. `checkerboard_ref` is the original's.
- `colour_shift`: distance (0-255) between the fill's mean RGB colour in the hole and the
  original's; `saturation_shift`: mean HSV saturation (0-1) of the fill in the hole minus the
  original's, negative when the fill is greyer.

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


class MetricError(ValueError):
    """Images that cannot be scored (a fill holding NaN or an infinity); the message says which."""


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
    return value.clamp(max=PSNR_CEILING)  # +inf (identical crops) to the ceiling; NaN stays NaN


def _ssim(pred: Tensor, target: Tensor) -> Tensor:
    window = min(SSIM_WINDOW, *pred.shape[-2:])
    window -= 1 - window % 2  # odd, as the Gaussian window must be
    return structural_similarity_index_measure(
        pred, target, data_range=1.0, kernel_size=window, reduction="none"
    )


def laplacian_variance(images: Tensor) -> Tensor:
    """Per-image variance of the Laplacian of the grayscale of [n, 3, h, w] images (valid conv)."""
    return laplacian(images).flatten(1).var(dim=1, unbiased=False)


def _sharpness(pred: Tensor, target: Tensor) -> Tensor:
    return (laplacian_variance(pred) + _EPS) / (laplacian_variance(target) + _EPS)


def laplacian(images: Tensor) -> Tensor:
    """Laplacian of the grayscale of [n, 3, h, w] images, valid convolution: [n, 1, h - 2, w - 2]."""
    gray = (images * _LUMA.to(images).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    return F.conv2d(gray, _LAPLACIAN.to(images).view(1, 1, 3, 3))


def _detail(pred: Tensor, target: Tensor) -> Tensor:
    fill, original = laplacian(pred).flatten(1), laplacian(target).flatten(1)
    return ((fill * original).sum(dim=1) + _EPS) / (original.square().sum(dim=1) + _EPS)


def period2_amplitude(images: Tensor) -> Tensor:
    """Per-image RMS amplitude of the grayscale's period-2 patterns, on the images' scale.

    Three separable 3x3 filters from h = [1, -2, 1] / 4 and l = [1, 2, 1] / 4 (h x h, h x l, l x h,
    valid convolution) have a response of exactly 1 at the frequencies a stride-2 up-convolution
    leaves (the checkerboard (pi, pi) and the stripes (pi, 0), (0, pi)) and 0 at zero frequency and
    on linear ramps. The value is the RMS of the three responses together: a +-A checkerboard or
    stripe pattern gives A, white grey noise of standard deviation s about 0.65 s.
    """
    gray = (images * _LUMA.to(images).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    high = torch.tensor([1.0, -2.0, 1.0], device=images.device, dtype=images.dtype) / 4
    low = torch.tensor([1.0, 2.0, 1.0], device=images.device, dtype=images.dtype) / 4
    kernels = torch.stack([torch.outer(high, high), torch.outer(high, low), torch.outer(low, high)])
    response = F.conv2d(gray, kernels[:, None])
    return response.square().sum(dim=1).flatten(1).mean(dim=1).sqrt()


def _checkerboard(pred: Tensor, target: Tensor) -> Tensor:
    return period2_amplitude(pred) * 255.0


def _checkerboard_ref(pred: Tensor, target: Tensor) -> Tensor:
    return period2_amplitude(target) * 255.0


def _border_steps(image: Tensor, outside: Tensor, mask: Tensor) -> Tensor:
    """Per-image mean |image(p) - outside(q)| * 255 over 4-neighbour pairs, p in the hole, q not."""
    hole = mask > 0.5
    total = torch.zeros(image.shape[0], dtype=torch.float32, device=image.device)
    count = torch.zeros_like(total)
    for dim in (2, 3):
        size = image.shape[dim]
        first, second = (slice(0, size - 1), slice(1, size))
        for p_side, q_side in ((first, second), (second, first)):
            p_index = [slice(None)] * 4
            q_index = [slice(None)] * 4
            p_index[dim], q_index[dim] = p_side, q_side
            pairs = (hole[tuple(p_index)] & ~hole[tuple(q_index)]).float()
            step = (image[tuple(p_index)] - outside[tuple(q_index)]).abs().mean(dim=1, keepdim=True)
            total += (step * pairs).flatten(1).sum(dim=1)
            count += pairs.flatten(1).sum(dim=1)
    return total / count.clamp(min=1.0) * 255.0


def edge_jump(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-image mean step (0-255) across the hole's border: the fill inside, the original outside."""
    return _border_steps(to_unit(pred), to_unit(target), mask)


def edge_jump_ref(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-image mean step (0-255) across the hole's border in the original: the natural edge."""
    unit = to_unit(target)
    return _border_steps(unit, unit, mask)


def _hole_mean(values: Tensor, mask: Tensor) -> Tensor:
    """[B, C, S, S] -> [B, C]: the mean of each channel over each image's hole pixels."""
    weight = mask.float()
    return (values * weight).sum(dim=(2, 3)) / weight.sum(dim=(2, 3)).clamp(min=1.0)


def _saturation(images: Tensor) -> Tensor:
    """HSV saturation of [B, 3, S, S] images in [0, 1]: (max - min) / max, 0 for black: [B, 1, S, S]."""
    high, low = images.amax(dim=1, keepdim=True), images.amin(dim=1, keepdim=True)
    return torch.where(high > 0, (high - low) / high.clamp(min=_EPS), torch.zeros_like(high))


def colour_shift(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-image distance (0-255) between the mean RGB of the fill and of the original in the hole."""
    return (_hole_mean(to_unit(pred), mask) - _hole_mean(to_unit(target), mask)).norm(dim=1) * 255.0


def saturation_shift(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-image mean HSV saturation in the hole, fill minus original (negative = greyer fill)."""
    fill, original = _saturation(to_unit(pred)), _saturation(to_unit(target))
    return (_hole_mean(fill, mask) - _hole_mean(original, mask))[:, 0]


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


def detail(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-image share of the original's Laplacian the fill reproduces, on the hole's box (1 = all)."""
    return _per_box(_detail, pred, target, mask)


def checkerboard(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-image period-2 amplitude (0-255) of the fill on the hole's box."""
    return _per_box(_checkerboard, pred, target, mask)


def checkerboard_ref(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-image period-2 amplitude (0-255) of the original on the hole's box."""
    return _per_box(_checkerboard_ref, pred, target, mask)


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
    "detail": detail,
    "edge_jump": edge_jump,
    "edge_jump_ref": edge_jump_ref,
    "checkerboard": checkerboard,
    "checkerboard_ref": checkerboard_ref,
    "colour_shift": colour_shift,
    "saturation_shift": saturation_shift,
}


@torch.no_grad()
def hole_metrics(pred: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Every metric of METRICS as a per-image [B] tensor; pred/target [B,3,S,S] in [-1,1], mask [B,1,S,S]."""
    if pred.shape != target.shape or mask.shape[0] != pred.shape[0] or mask.shape[-2:] != pred.shape[-2:]:
        raise ValueError(f"shapes do not match: pred {tuple(pred.shape)}, target "
                         f"{tuple(target.shape)}, mask {tuple(mask.shape)}")
    pred, target, mask = pred.detach().float(), target.detach().float(), mask.detach().float()
    bad = int((~torch.isfinite(pred)).flatten(1).any(dim=1).sum())
    if bad:
        raise MetricError(f"{bad} of {pred.shape[0]} fills hold NaN or an infinity (a diverged generator); "
                          f"not scored")
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
