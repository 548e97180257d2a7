"""Table 1's held-out numbers: the classical detector, the position prior, accuracy by variance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybridgan.blur_metrics import BlurHeldOut, laplacian_ratio, merge, summary
from hybridgan.data.blur import blur_in


def _textured(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _square(n: int, size: int = 32, top: int = 8, side: int = 12) -> torch.Tensor:
    square = torch.zeros(n, 1, size, size)
    square[..., top:top + side, top:top + side] = 1
    return square


def test_the_laplacian_ratio_is_about_one_on_sharp_texture_and_low_in_a_blurred_square():
    images, square = _textured(4), _square(4)
    sharp = laplacian_ratio(images, square)
    pixels = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
    blurred = np.stack([blur_in(p, (8, 8, 12), 4.0) for p in pixels])
    blurred = torch.from_numpy(blurred).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert sharp.tolist() == pytest.approx([1.0] * 4, abs=0.15)
    assert (laplacian_ratio(blurred, square) < 0.5).all()


def _held_out(decided_real, is_real, variance, pixel_score, ratio_images) -> dict:
    """summary() of one batch whose drawn square is `_square` and blurred where `is_real` is 0."""
    collected = BlurHeldOut()
    n = len(is_real)
    square = _square(n)
    target = torch.where(torch.tensor(is_real).view(-1, 1, 1, 1) > 0, torch.ones_like(square), 1 - square)
    collected.add(0, torch.tensor(decided_real), torch.tensor(is_real, dtype=torch.float32),
                  torch.tensor(variance), ratio_images, pixel_score, target, square)
    return summary(merge([collected.arrays()]), 5.0, 15.0)


def test_a_map_of_the_usual_square_ties_the_prior_and_a_blur_detecting_map_beats_it():
    n = 8
    is_real = [1.0, 0.0] * 4
    square = _square(n)
    prior_like = -square * 5  # "blurred" wherever the square usually is, original or not
    detector = torch.where(torch.tensor(is_real).view(-1, 1, 1, 1) > 0, torch.full_like(square, 5.0), 5 - 10 * square)
    common = dict(decided_real=[r > 0 for r in is_real], is_real=is_real, variance=[6.0, 6.0, 10.0, 10.0] * 2,
                  ratio_images=_textured(n))
    place = _held_out(pixel_score=prior_like, **common)
    blur = _held_out(pixel_score=detector, **common)
    assert place["pixel_auroc"] == pytest.approx(place["prior_auroc"])
    assert blur["pixel_auroc"] == 1.0 > blur["prior_auroc"]
    assert place["accuracy_originals"] == 1.0
    assert place["accuracy_variance_5-8.33"] == 1.0 and np.isnan(place["accuracy_variance_11.7-15"])


def test_the_classical_detector_fits_its_threshold_on_the_first_half_and_scores_the_second():
    n = 8
    images = _textured(n)
    pixels = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
    is_real = [1.0, 0.0] * 4
    shown = np.stack([p if real else blur_in(p, (8, 8, 12), 4.0) for p, real in zip(pixels, is_real)])
    shown = torch.from_numpy(shown).permute(0, 3, 1, 2).float() / 127.5 - 1
    result = _held_out(decided_real=[True] * n, is_real=is_real, variance=[6.0] * n,
                       pixel_score=torch.zeros(n, 1, 32, 32), ratio_images=shown)
    assert result["classical_accuracy"] == 1.0
    assert result["accuracy_second_half"] == 0.5  # D says "real" for all: right on the originals only
