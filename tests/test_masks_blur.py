"""Masks (hole where the config says) and the pretraining blur (only inside the square, really blurred)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybridgan.config import BlurConfig, MaskConfig
from hybridgan.data.blur import blur_square, blur_target, draw_square, gaussian_kernel, variance_range
from hybridgan.data.masks import apply_mask, center_box, make_masks
from hybridgan.data.synthetic import synthetic_face


def test_center_mask_is_exactly_the_central_square():
    masks = make_masks(MaskConfig(kind="center", hole_size=16), image_size=32, batch=3)
    assert masks.shape == (3, 1, 32, 32) and masks.dtype == torch.float32
    assert center_box(32, 16) == (8, 8, 16)
    expected = torch.zeros(32, 32)
    expected[8:24, 8:24] = 1
    assert torch.equal(masks[:, 0], expected.expand(3, 32, 32))


def test_apply_mask_zeroes_the_hole_only():
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = make_masks(MaskConfig(kind="center", hole_size=16), 32, 2)
    masked = apply_mask(image, mask)
    assert torch.all(masked[:, :, 8:24, 8:24] == 0)
    assert torch.equal(masked[:, :, :8], image[:, :, :8])


def test_random_box_sides_in_range_and_seeded():
    cfg = MaskConfig(kind="random_box", min_box=8, max_box=12)
    masks = make_masks(cfg, 32, 50, torch.Generator().manual_seed(1))
    again = make_masks(cfg, 32, 50, torch.Generator().manual_seed(1))
    assert torch.equal(masks, again)
    for mask in masks[:, 0]:
        rows = torch.nonzero(mask.any(dim=1)).flatten()
        cols = torch.nonzero(mask.any(dim=0)).flatten()
        side = len(rows)
        assert 8 <= side <= 12 and len(cols) == side
        assert mask.sum() == side * side  # one solid square
    assert len({int(m.sum()) for m in masks}) > 1  # sides vary


def test_strokes_are_binary_thick_and_varied():
    cfg = MaskConfig(kind="strokes", strokes=3, stroke_width=6)
    masks = make_masks(cfg, 64, 8, torch.Generator().manual_seed(0))
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    coverage = masks.mean(dim=(1, 2, 3))
    assert torch.all(coverage > 0.02) and torch.all(coverage < 0.8)
    assert not torch.equal(masks[0], masks[1])


def _laplacian_variance(image: np.ndarray) -> float:
    grey = image.astype(np.float64).mean(axis=2)
    lap = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return float(lap.var())


def test_blur_changes_only_the_square_and_removes_detail():
    image = np.asarray(synthetic_face(3))
    cfg = BlurConfig(top_left=80, min_side=64, max_side=80, min_variance=5, max_variance=15)
    blurred, (top, left, side) = blur_square(image, np.random.default_rng(0), cfg)
    assert (top, left) == (80, 80) and 64 <= side <= 80
    outside = np.ones(image.shape[:2], bool)
    outside[top:top + side, left:left + side] = False
    assert np.array_equal(blurred[outside], image[outside])
    inside = (slice(top, top + side), slice(left, left + side))
    assert np.abs(blurred[inside].astype(int) - image[inside]).mean() > 1
    assert _laplacian_variance(blurred[inside]) < 0.5 * _laplacian_variance(image[inside])


def test_blur_is_an_exact_gaussian():
    kernel = gaussian_kernel(2.0)
    assert len(kernel) == 2 * 6 + 1 and kernel.sum() == pytest.approx(1.0, abs=1e-6)
    # A single bright pixel spreads as the outer product of the kernel.
    image = np.zeros((64, 64, 3), np.uint8)
    image[32, 32] = 255
    cfg = BlurConfig(top_left=16, min_side=32, max_side=32, min_variance=4.0, max_variance=4.0)
    blurred, _ = blur_square(image, np.random.default_rng(0), cfg)
    expected = 255 * np.outer(kernel, kernel)
    assert np.abs(blurred[26:39, 26:39, 0] - expected).max() <= 0.51


def test_blur_draws_side_and_variance_from_the_rng():
    image = np.asarray(synthetic_face(0))
    cfg = BlurConfig()
    sides = {blur_square(image, np.random.default_rng(s), cfg)[1][2] for s in range(20)}
    assert len(sides) > 3 and min(sides) >= 64 and max(sides) <= 80
    a, _ = blur_square(image, np.random.default_rng(5), cfg)
    b, _ = blur_square(image, np.random.default_rng(5), cfg)
    assert np.array_equal(a, b)


def test_blur_target_zero_inside_one_outside():
    target = blur_target(16, (2, 3, 5))
    assert target.dtype == np.float32 and target.shape == (16, 16)
    assert target[2:7, 3:8].max() == 0 and target.sum() == 16 * 16 - 25


def test_random_position_squares_lie_anywhere_in_the_frame_and_fixed_ones_stay_put():
    image = np.asarray(synthetic_face(1))
    fixed = BlurConfig()
    moving = BlurConfig(random_position=True)
    corners = {blur_square(image, np.random.default_rng(s), moving)[1][:2] for s in range(30)}
    assert len(corners) > 20
    assert all(0 <= top <= 256 - 64 and 0 <= left <= 256 - 64 for top, left in corners)
    # the fixed square draws side and variance first, exactly as before the option existed
    for seed in range(5):
        a, box_a = blur_square(image, np.random.default_rng(seed), fixed)
        b, box_b = blur_square(image, np.random.default_rng(seed), moving)
        assert box_a[:2] == (80, 80) and box_a[2] == box_b[2]


def test_the_blur_schedule_moves_the_variance_from_the_start_range_to_the_papers():
    cfg = BlurConfig(min_variance=5, max_variance=15, schedule_epochs=4, start_min_variance=45, start_max_variance=95)
    assert variance_range(cfg, 0) == (45, 95)
    assert variance_range(cfg, 2) == pytest.approx((25, 55))
    assert variance_range(cfg, 4) == variance_range(cfg, 9) == variance_range(cfg, None) == (5, 15)
    assert variance_range(BlurConfig(), 0) == (5.0, 15.0)  # no schedule: the configured range from the start
    drawn = [draw_square(np.random.default_rng(s), cfg, 256, 256, epoch=0)[1] for s in range(50)]
    assert min(drawn) >= 45 and max(drawn) <= 95
