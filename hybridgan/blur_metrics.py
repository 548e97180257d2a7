"""What the blur pretraining's held-out pass measures (Table 1), beyond loss and accuracy.

Accuracy alone hides two ways a discriminator can look trained without having learned blur:
- **the square's usual place**: with the paper's fixed square, the per-pixel head lowers its loss by
  predicting "blurred" where the square always is. `pixel_auroc` scores D's per-pixel map over
  every pixel of every held-out image (positives: the pixels inside the square of a blurred image;
  negatives: all others, the same place on an original included), and `prior_auroc` scores the
  best map that knows only the place: each pixel's frequency inside the square over the held-out
  blurred images. A D that learned blur beats the prior; one that learned the place ties it.
- **an easy feature**: `classical_accuracy` is a one-feature detector told where the square is:
  mean |Laplacian| of the grey image inside the square over the mean outside it, blurred when below
  a threshold chosen on the first half of the held-out images, scored on the second half;
  `accuracy_second_half` is D's accuracy on those same images. A D that cannot beat it learned little.
`accuracy_originals` and `accuracy_variance_<lo>-<hi>` split the accuracy by what was shown: the
originals, and the blurred faces by the Gaussian's variance (equal thirds of the configured range).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

from hybridgan.metrics import laplacian

PIXEL_STRIDE = 4  # per-pixel AUROC on every 4th pixel in both directions: 1/16 of the pixels, same ranking
BUCKETS = 3


def laplacian_ratio(images: Tensor, square: Tensor) -> Tensor:
    """Per image, mean |Laplacian| of the grey image inside `square` (weights [B,1,S,S] in [0, 1],
    1 inside) over the mean outside it: about 1 for a sharp face, below 1 when the square is blurred."""
    detail = laplacian(images.float()).abs()
    inside = square.float()[:, :, 1:-1, 1:-1]
    mean_in = (detail * inside).sum(dim=(1, 2, 3)) / inside.sum(dim=(1, 2, 3)).clamp_min(1.0)
    mean_out = (detail * (1 - inside)).sum(dim=(1, 2, 3)) / (1 - inside).sum(dim=(1, 2, 3)).clamp_min(1.0)
    return mean_in / mean_out.clamp_min(1e-12)


class BlurHeldOut:
    """Collects one rank's held-out images (per image and subsampled per pixel) for `summary`."""

    def __init__(self) -> None:
        self.rows: dict[str, list[np.ndarray]] = {name: [] for name in (
            "index", "decided_real", "is_real", "variance", "ratio", "pixel_score", "pixel_blurred", "square")}

    def add(self, first_index: int, decided_real: Tensor, is_real: Tensor, variance: Tensor, inputs: Tensor,
            pixel_score: Tensor, pixel_target: Tensor, drawn_square: Tensor) -> None:
        """One batch: D's decisions, the truth, the drawn variance, the shown images, D's per-pixel
        score, its target (0 inside a blurred square) and the drawn square (1 inside, blurred or not)."""
        n = inputs.shape[0]
        sub = (slice(None), 0, slice(None, None, PIXEL_STRIDE), slice(None, None, PIXEL_STRIDE))
        values = {
            "index": torch.arange(first_index, first_index + n), "decided_real": decided_real,
            "is_real": is_real, "variance": variance, "ratio": laplacian_ratio(inputs, drawn_square.to(inputs.device)),
            "pixel_score": pixel_score[sub].flatten(1), "pixel_blurred": (pixel_target[sub] < 0.5).flatten(1),
            "square": drawn_square[sub].flatten(1),
        }
        for name, value in values.items():
            self.rows[name].append(value.detach().float().cpu().numpy())

    def arrays(self) -> dict[str, np.ndarray]:
        """This rank's rows, concatenated (empty arrays when it saw no batch)."""
        return {name: np.concatenate(parts) if parts else np.zeros((0,), np.float32) for name, parts in self.rows.items()}


def merge(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The ranks' `arrays()` as one set, in held-out order (by image index)."""
    parts = [p for p in parts if p["index"].size]
    merged = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    order = np.argsort(merged["index"], kind="stable")
    return {name: value[order] for name, value in merged.items()}


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    if labels.all() or not labels.any():
        return float("nan")
    return float(binary_auroc(torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))))


def _classical(ratio: np.ndarray, is_real: np.ndarray) -> tuple[float, np.ndarray]:
    """The detector's accuracy on the second half, its threshold fit on the first (best accuracy)."""
    half = len(ratio) // 2
    fit_ratio, fit_real = ratio[:half], is_real[:half]
    candidates = np.unique(fit_ratio)
    best = max(candidates, key=lambda t: ((fit_ratio > t) == fit_real).mean()) if candidates.size else 1.0
    second = slice(half, None)
    return float(((ratio[second] > best) == is_real[second]).mean()), np.arange(len(ratio))[second]


def summary(data: dict[str, np.ndarray], min_variance: float, max_variance: float) -> dict[str, Any]:
    """Table 1's numbers from the merged held-out set (see the module docstring)."""
    correct = data["decided_real"] == data["is_real"]
    real = data["is_real"] > 0.5
    out: dict[str, Any] = {"accuracy_originals": float(correct[real].mean()) if real.any() else float("nan")}
    edges = np.linspace(min_variance, max_variance, BUCKETS + 1)
    for low, high in zip(edges[:-1], edges[1:]):
        inside = ~real & (data["variance"] >= low) & (data["variance"] <= high)
        out[f"accuracy_variance_{low:.3g}-{high:.3g}"] = float(correct[inside].mean()) if inside.any() else float("nan")
    out["classical_accuracy"], second = _classical(data["ratio"], real)
    out["accuracy_second_half"] = float(correct[second].mean())
    blurred = data["pixel_blurred"] > 0.5
    out["pixel_auroc"] = _auroc(-data["pixel_score"].ravel(), blurred.ravel())
    prior = data["square"][~real].mean(axis=0) if (~real).any() else np.zeros(data["square"].shape[1])
    out["prior_auroc"] = _auroc(np.broadcast_to(prior, blurred.shape).ravel(), blurred.ravel())
    return out
