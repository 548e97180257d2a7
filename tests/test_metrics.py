"""Hole metrics on hand-made cases, mean-colour fill, and the report tables from hand-written logs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridgan.metrics import (
    METRICS, PSNR_CEILING, HoleMetrics, MetricError, _psnr, hole_box, hole_metrics, mean_fill, to_unit,
)
from hybridgan.report import (
    ReportError, bootstrap_interval, markdown_table, paired_differences, read_metrics, sharper_at_equal_psnr,
    table1, table2,
)


def centre_mask(batch: int, size: int, hole: int) -> torch.Tensor:
    mask = torch.zeros(batch, 1, size, size)
    start = (size - hole) // 2
    mask[:, :, start:start + hole, start:start + hole] = 1.0
    return mask


def faces(batch: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1] with some texture (upsampled noise)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, size // 4, size // 4, generator=gen)
    fine = torch.rand(batch, 3, size, size, generator=gen)
    image = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False) * 0.7 + fine * 0.3
    return image * 2 - 1


def test_identical_images_hit_the_ceiling():
    image, mask = faces(), centre_mask(4, 32, 16)
    values = hole_metrics(image, image.clone(), mask)
    assert set(values) == set(METRICS) == {
        "psnr", "ssim", "l1", "l2", "sharpness", "detail", "edge_jump", "edge_jump_ref",
        "checkerboard", "checkerboard_ref", "colour_shift", "saturation_shift"}
    assert torch.equal(values["psnr"], torch.full((4,), PSNR_CEILING))
    assert torch.allclose(values["ssim"], torch.ones(4), atol=1e-5)
    assert torch.equal(values["l1"], torch.zeros(4)) and torch.equal(values["l2"], torch.zeros(4))
    assert torch.allclose(values["sharpness"], torch.ones(4))
    assert torch.allclose(values["detail"], torch.ones(4))
    assert torch.allclose(values["edge_jump"], values["edge_jump_ref"])
    assert torch.allclose(values["checkerboard"], values["checkerboard_ref"])
    assert torch.equal(values["colour_shift"], torch.zeros(4))
    assert torch.equal(values["saturation_shift"], torch.zeros(4))


def test_gaussian_noise_gives_the_expected_psnr():
    gen = torch.Generator().manual_seed(1)
    target01 = 0.25 + 0.5 * torch.rand(2, 3, 64, 64, generator=gen)  # noise never clips
    sigma = 0.05
    pred01 = target01 + sigma * torch.randn(2, 3, 64, 64, generator=gen)
    values = hole_metrics(pred01 * 2 - 1, target01 * 2 - 1, centre_mask(2, 64, 32))
    expected = -10 * math.log10(sigma ** 2)  # 26.02 dB
    assert values["psnr"].tolist() == pytest.approx([expected] * 2, abs=0.4)
    assert values["l2"].tolist() == pytest.approx([sigma ** 2] * 2, rel=0.1)
    # For a box hole PSNR and L2 are the same measurement.
    assert torch.allclose(values["psnr"], -10 * torch.log10(values["l2"]), atol=1e-3)
    assert values["l1"].tolist() == pytest.approx([sigma * math.sqrt(2 / math.pi)] * 2, rel=0.1)
    assert (values["ssim"] < 0.95).all() and (values["ssim"] > 0).all()


def test_pixels_outside_the_hole_do_not_count():
    target, mask = faces(seed=2), centre_mask(4, 32, 16)
    pred = target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(3))
    before = hole_metrics(pred, target, mask)
    garbage = torch.rand(pred.shape) * 2 - 1
    after = hole_metrics(pred * mask + garbage * (1 - mask), target, mask)
    for name in METRICS:
        assert torch.equal(before[name], after[name]), name


def unit(image01: torch.Tensor) -> torch.Tensor:
    """[0, 1] images to the [-1, 1] scale the metrics take."""
    return image01 * 2 - 1


def test_edge_jump_of_a_flat_seam_and_of_a_ramp():
    mask = centre_mask(1, 32, 16)
    grey = torch.full((1, 3, 32, 32), 0.5)
    patch = grey * (1 - mask) + 0.7 * mask  # the hole 0.2 brighter: a hard seam of 51 grey levels
    values = hole_metrics(unit(patch), unit(grey), mask)
    assert values["edge_jump"].item() == pytest.approx(0.2 * 255, abs=1e-3)
    assert values["edge_jump_ref"].item() == pytest.approx(0.0, abs=1e-6)
    # A ramp of 4 grey levels per column: steps of 4 across the left and right borders, 0 across
    # the top and bottom ones, 16 pairs each: mean 2. An exact fill matches it.
    ramp = (torch.arange(32).float() * 4 / 255).expand(1, 3, 32, 32)
    values = hole_metrics(unit(ramp), unit(ramp), mask)
    assert values["edge_jump_ref"].item() == pytest.approx(2.0, abs=1e-3)
    assert values["edge_jump"].item() == pytest.approx(2.0, abs=1e-3)


def checker(size: int, amplitude: float) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (amplitude * (1 - 2 * ((rows + cols) % 2)).float()).expand(1, 3, size, size)


def test_checkerboard_measures_the_period2_amplitude():
    mask = centre_mask(1, 32, 16)
    smooth = F.interpolate(torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.4 + 0.3,
                           size=32, mode="bilinear", align_corners=False)
    chequered = smooth + checker(32, 10 / 255)
    stripes = smooth + (10 / 255 * (1 - 2 * (torch.arange(32) % 2))).float().expand(1, 3, 32, 32)
    noisy = smooth + 10 / 255 * torch.randn(smooth.shape, generator=torch.Generator().manual_seed(1))
    assert hole_metrics(unit(smooth), unit(smooth), mask)["checkerboard"].item() < 1.0
    values = hole_metrics(unit(chequered), unit(smooth), mask)
    assert values["checkerboard"].item() == pytest.approx(10.0, abs=0.2)
    assert values["checkerboard_ref"].item() < 1.0
    assert hole_metrics(unit(stripes), unit(smooth), mask)["checkerboard"].item() == pytest.approx(10.0, abs=0.2)
    # white noise of the same strength per channel: 0.67 * 10 in grey, of which the filters keep 0.65
    assert 3.5 < hole_metrics(unit(noisy), unit(smooth), mask)["checkerboard"].item() < 5.5


def test_detail_is_not_fooled_by_noise_or_checkerboard():
    mask = centre_mask(4, 32, 16)
    original = (faces(seed=5) + 1) / 2
    blurred = F.avg_pool2d(F.pad(original, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    noise = 0.1 * torch.randn(original.shape, generator=torch.Generator().manual_seed(6))
    score = {name: hole_metrics(unit(image), unit(original), mask) for name, image in {
        "exact": original, "blurred": blurred, "blurred+noise": blurred + noise,
        "exact+checker": original + checker(32, 0.03), "flat": torch.full_like(original, 0.5)}.items()}
    assert torch.allclose(score["exact"]["detail"], torch.ones(4))
    assert (score["blurred"]["detail"] < 0.6).all()
    assert torch.allclose(score["blurred+noise"]["detail"], score["blurred"]["detail"], atol=0.1)
    assert score["exact+checker"]["detail"].mean().item() == pytest.approx(1.0, abs=0.1)
    assert torch.allclose(score["flat"]["detail"], torch.zeros(4), atol=1e-6)
    # the Laplacian-variance ratio is fooled: noise and a checkerboard read as extra sharpness
    assert (score["blurred+noise"]["sharpness"] > 1).all() and (score["exact+checker"]["sharpness"] > 1.5).all()


def test_colour_and_saturation_shift():
    mask = centre_mask(1, 32, 16)
    original = torch.tensor([0.8, 0.4, 0.2]).view(1, 3, 1, 1).expand(1, 3, 32, 32)  # saturation 0.75
    redder = original + torch.tensor([12 / 255, 0, 0]).view(1, 3, 1, 1) * mask
    grey = original * (1 - mask) + 0.5 * mask
    values = hole_metrics(unit(redder), unit(original), mask)
    assert values["colour_shift"].item() == pytest.approx(12.0, abs=1e-3)
    values = hole_metrics(unit(grey), unit(original), mask)
    assert values["saturation_shift"].item() == pytest.approx(-0.75, abs=1e-5)
    assert values["colour_shift"].item() == pytest.approx(255 * math.dist((0.8, 0.4, 0.2), (0.5,) * 3), abs=1e-3)


def test_per_image_boxes_for_random_holes():
    target = faces(batch=2, seed=4)
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, 2:14, 4:20] = 1  # 12 x 16
    mask[1, :, 20:24, 20:24] = 1  # 4 x 4, grown to the SSIM window
    assert hole_box(mask[0]) == (2, 4, 12, 16)
    assert hole_box(mask[1]) == (16, 16, 11, 11)
    pred = target.clone()
    pred[0] += 0.2 * mask[0]  # only image 0 changes, inside its hole
    values = hole_metrics(pred.clamp(-1, 1), target, mask)
    assert values["psnr"][1] == PSNR_CEILING and values["psnr"][0] < 40
    assert values["l1"][1] == 0 and values["l1"][0] > 0


def test_blurred_hole_is_less_sharp():
    target, mask = faces(seed=5), centre_mask(4, 32, 16)
    kernel = torch.ones(3, 1, 5, 5) / 25
    blurred = F.conv2d(F.pad(target, (2, 2, 2, 2), mode="replicate"), kernel, groups=3)
    values = hole_metrics(target * (1 - mask) + blurred * mask, target, mask)
    assert (values["sharpness"] < 0.5).all()
    assert (values["psnr"] < PSNR_CEILING).all()


def test_mean_fill():
    image = faces(batch=2, seed=6)
    mask = centre_mask(2, 32, 16)
    filled = mean_fill(image * (1 - mask), mask)
    known = (1 - mask).bool().expand_as(image)
    assert torch.equal(filled[known], image[known])
    for b in range(2):
        expected = image[b][known[b]].view(3, -1).mean(dim=1)
        assert torch.allclose(filled[b, :, 16, 16], expected, atol=1e-6)
        assert torch.allclose(filled[b, :, 8:24, 8:24], expected.view(3, 1, 1).expand(3, 16, 16))
    # A flat-coloured hole has no high frequencies: the mean fill is maximally blurry.
    values = hole_metrics(filled, image, mask)
    assert (values["sharpness"] < 0.01).all()


def test_hole_metrics_accumulator():
    tracker = HoleMetrics()
    target, mask = faces(seed=7), centre_mask(4, 32, 16)
    tracker.update(target, target, mask)
    tracker.add(hole_metrics((target + 0.2 * mask).clamp(-1, 1), target, mask))
    summary = tracker.compute()
    assert summary["n"] == 8
    assert tracker.per_image()["psnr"][:4].tolist() == [PSNR_CEILING] * 4
    assert 0 < summary["l1"] < 0.1 and summary["psnr"] < PSNR_CEILING
    empty = HoleMetrics()  # a rank that saw no batch still reports every metric, so reductions line up
    assert set(empty.per_image()) == set(METRICS) and empty.per_image()["l1"].numel() == 0
    summary = empty.compute()
    assert summary["n"] == 0 and all(math.isnan(summary[name]) for name in METRICS)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes do not match"):
        hole_metrics(faces(), faces(batch=2), centre_mask(4, 32, 16))


# --- report tables -----------------------------------------------------------------------------


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, "x"], ["2", "y"]]) == (
        "| a | b |\n| --- | --- |\n| 1 | x |\n| 2 | y |\n"
    )


def test_table1(tmp_path):
    records = [
        {"step": 10, "epoch": 1, "split": "train", "loss": 0.5},
        {"step": 20, "epoch": 1, "split": "test", "test_loss": 0.0131, "test_accuracy": 0.9912},
        {"step": 40, "epoch": 2, "split": "test", "test_loss": 0.02, "test_accuracy": 0.9},
        {"step": 40, "epoch": 2, "split": "test", "test_loss": 0.008, "test_accuracy": 0.995},
        {"step": 60, "epoch": 3, "split": "test", "test_loss": 0.00712, "test_accuracy": 1.0},
    ]
    stage = write_jsonl(tmp_path / "pretrain", records)
    assert len(read_metrics(stage)) == 5
    assert table1(stage) == (
        "| epoch | test loss | test accuracy |\n| --- | --- | --- |\n"
        "| 1 | 0.0131 | 99.1% |\n| 2 | 0.008 | 99.5% |\n| 3 | 0.00712 | 100.0% |\n"
    )


def test_table2_matches_the_papers_layout(tmp_path):
    pathak = [(11, 0.999, 0.196, 0.0013), (12, 0.999, 0.194, 0.0013), (13, 0.999, 0.191, 0.0012)]
    hybrid = [(11, 0.322, 0.149, 0.241), (12, 0.321, 0.147, 0.246), (13, 0.328, 0.136, 0.238)]

    def records(rows):
        early = [{"step": 1, "epoch": 10, "split": "epoch", "gen_adv_loss": 9, "gen_pixel_loss": 9,
                  "disc_loss": 9}, {"step": 2, "epoch": 13, "split": "train", "gen_adv_loss": 5}]
        return early + [{"step": e * 10, "epoch": e, "split": "epoch", "gen_adv_loss": a,
                         "gen_pixel_loss": p, "disc_loss": d} for e, a, p, d in rows]

    hybrid_dir = write_jsonl(tmp_path / "train-hybrid", records(hybrid))
    pathak_dir = write_jsonl(tmp_path / "train-pathak", records(pathak))
    lines = table2(hybrid_dir, pathak_dir).splitlines()
    assert lines[0] == ("| epoch | Pathak gen_adv_loss | Pathak gen_pixel_loss | Pathak disc_loss "
                        "| hybrid gen_adv_loss | hybrid gen_pixel_loss | hybrid disc_loss |")
    assert lines[2:] == [
        "| 11 | 0.999 | 0.196 | 0.0013 | 0.322 (-68%) | 0.149 (-24%) | 0.241 |",
        "| 12 | 0.999 | 0.194 | 0.0013 | 0.321 (-68%) | 0.147 (-24%) | 0.246 |",
        "| 13 | 0.999 | 0.191 | 0.0012 | 0.328 (-67%) | 0.136 (-29%) | 0.238 |",
    ]


def test_report_errors_name_the_file(tmp_path):
    with pytest.raises(ReportError, match="metrics.jsonl"):
        read_metrics(tmp_path / "nowhere")
    stage = write_jsonl(tmp_path / "pretrain", [{"step": 1, "epoch": 1, "split": "train"}])
    with pytest.raises(ReportError, match="no records with split 'test'"):
        table1(stage)
    (stage / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ReportError, match="metrics.jsonl:2"):
        read_metrics(stage)
    (stage / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "spl')  # killed mid-write
    assert read_metrics(stage) == [{"step": 1}]


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 2.0, size=400)
    mean, low, high = bootstrap_interval(values, seed=3)
    assert mean == pytest.approx(values.mean())
    # the percentile interval of a mean of 400 draws: about +-1.96 * 2 / 20 = +-0.196 around it
    assert high - low == pytest.approx(2 * 1.96 * values.std() / 20, rel=0.1)
    assert low < mean < high
    assert bootstrap_interval(values, seed=3) == (mean, low, high)
    assert bootstrap_interval([0.5] * 10, seed=0) == (0.5, 0.5, 0.5)


def test_paired_differences_and_the_verdict():
    faces = 200
    rng = np.random.default_rng(1)
    pathak = {"psnr": rng.normal(20, 2, faces), "detail": rng.normal(0.3, 0.1, faces)}
    sharper = {"psnr": pathak["psnr"] + rng.normal(0, 0.1, faces), "detail": pathak["detail"] + 0.05}
    diffs = paired_differences(sharper, pathak, seed=0)
    assert diffs["detail"]["mean"] == pytest.approx(0.05) and diffs["detail"]["low"] == pytest.approx(0.05)
    assert diffs["psnr"]["n"] == faces and abs(diffs["psnr"]["mean"]) < 0.05
    assert sharper_at_equal_psnr(diffs).startswith("At equal PSNR (within +-0.5 dB) the hybrid fill is sharper than")
    same = {"psnr": sharper["psnr"], "detail": pathak["detail"] + rng.normal(0, 0.05, faces)}
    assert " is neither sharper nor blurrier than " in sharper_at_equal_psnr(paired_differences(same, pathak, 0))
    worse = {"psnr": pathak["psnr"] - 2, "detail": pathak["detail"] - 0.05}
    verdict = sharper_at_equal_psnr(paired_differences(worse, pathak, 0))
    assert verdict.startswith("The PSNRs are not equal") and " is blurrier than " in verdict
    with pytest.raises(ReportError, match="metric psnr: 3 faces against 200"):
        paired_differences({"psnr": [1, 2, 3]}, pathak, 0)


def test_a_fill_with_nan_or_infinity_is_an_error_never_a_score():
    image, mask = faces(), centre_mask(4, 32, 16)
    for bad in (float("nan"), float("inf")):
        fill = image.clone()
        fill[1, 0, 12, 12] = bad
        with pytest.raises(MetricError, match="^1 of 4 fills hold NaN or an infinity"):
            hole_metrics(fill, image, mask)
    crop = to_unit(image)[:, :, 8:24, 8:24]
    poisoned = crop.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    psnr = _psnr(poisoned, crop)  # was nan_to_num'd into the 100 dB ceiling
    assert math.isnan(psnr[0]) and torch.equal(psnr[1:], torch.full((3,), PSNR_CEILING))
