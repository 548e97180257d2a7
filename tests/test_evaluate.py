"""evaluate on the tiny synthetic pack with two untrained generators: files, sizes, values, errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from stage_runs import failure, free_port, run_stage
from hybridgan.evaluate import BASELINE, TELEA, main
from hybridgan.exports import save_export
from hybridgan.metrics import METRICS
from hybridgan.models import build_generator
from hybridgan.perceptual import STAGING


def strict_json(text: str) -> dict:
    """json.loads refusing NaN and Infinity, which are not JSON."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} in eval.json")

    return json.loads(text, parse_constant=refuse)


def make_run(stage: Path, shards: Path, runs: Path, kind: str, seed: int, epochs: int = 0) -> Path:
    """An untrained generator export in `stage`, and `epochs` hand-written epoch records."""
    torch.manual_seed(seed)
    cfg = tiny_config(shards, runs, f"discriminator.kind={kind}")
    save_export(build_generator(cfg).state_dict(), stage / "generator.safetensors", cfg, "generator")
    records = [{"step": 4 * e, "epoch": e, "split": "epoch", "gen_adv_loss": 1.0 / e,
                "gen_pixel_loss": 0.2 / e, "disc_loss": 0.5} for e in range(1, epochs + 1)]
    (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return stage


@pytest.fixture(scope="module")
def evaluated(tiny_shards: Path, tmp_path_factory) -> tuple[Path, int]:
    runs = tmp_path_factory.mktemp("runs")
    hybrid = make_run(runs / "t" / "train-hybrid", tiny_shards, runs, "hybrid", 0, epochs=3)
    pathak = make_run(runs / "t" / "train-pathak", tiny_shards, runs, "pathak", 1)
    rc = main([str(hybrid), str(pathak / "generator.safetensors"), "--batch-size", "3"])
    return runs / "t" / "eval", rc


def test_eval_files_and_values(evaluated):
    out, rc = evaluated
    assert rc == 0
    results = strict_json((out / "eval.json").read_text())
    assert results["split"] == "test" and results["mask"] == {"kind": "center", "hole_size": 16, "seed": 0}
    rows = {row["name"]: row for row in results["runs"]}
    assert list(rows) == ["train-hybrid", "train-pathak", BASELINE, TELEA]
    assert rows["train-hybrid"]["discriminator"] == "hybrid" and rows["train-pathak"]["discriminator"] == "pathak"
    for row in rows.values():
        assert row["n"] == 8  # the whole test split (8 images, batches of 3, 3 + 3 + 2)
        assert set(row["metrics"]) == {*METRICS, "lpips"} and row["metrics"]["lpips"] is None
        assert all(math.isfinite(v) for m, v in row["metrics"].items() if m != "lpips")
        assert row["set_metrics"] == {"fid": None, "kid_mean": None, "kid_std": None, "kid_subset": None}
        assert 0 < row["metrics"]["psnr"] < 100 and -1 <= row["metrics"]["ssim"] <= 1
        assert 0 < row["metrics"]["l2"] <= row["metrics"]["l1"] <= 1
    # Two different untrained generators give different fills.
    assert rows["train-hybrid"]["metrics"]["psnr"] != rows["train-pathak"]["metrics"]["psnr"]
    table = (out / "eval.md").read_text().splitlines()
    assert table[0] == ("| run | discriminator | PSNR (dB) | SSIM | L1 | L2 | sharpness | detail | edge jump (original) "
                        "| checkerboard (original) | colour shift | saturation shift | images |")
    assert table[2].startswith("| train-hybrid | hybrid | ") and table[4].startswith(f"| {BASELINE} | - | ")
    assert table[5].startswith(f"| {TELEA} | - | ") and table[5].endswith(" | 8 |")
    # Telea's classical fill continues the border: a smaller seam than the flat mean-colour fill
    assert rows[TELEA]["metrics"]["edge_jump"] < rows[BASELINE]["metrics"]["edge_jump"]
    # no staged perceptual weights: each perceptual metric says so in one line, the rest is all there
    assert results["perceptual"] == {"lpips": f"skipped: eval.lpips_weights is not set ({STAGING})",
                                     "fid_kid": f"skipped: eval.inception_weights is not set ({STAGING})"}
    text = (out / "eval.md").read_text()
    assert f"| {TELEA} | - | - | - | 8 |" in text and f"- lpips: skipped: eval.lpips_weights is not set" in text


def test_paired_comparison_of_hybrid_and_pathak(evaluated):
    out, _ = evaluated
    results = json.loads((out / "eval.json").read_text())
    compared = results["comparison"]
    assert (compared["first"], compared["second"]) == ("train-hybrid", "train-pathak")
    means = {row["name"]: row["metrics"] for row in results["runs"]}
    assert set(compared["differences"]) == {m for m in METRICS if not m.endswith("_ref")}
    for metric, diff in compared["differences"].items():
        expected = means["train-hybrid"][metric] - means["train-pathak"][metric]
        assert diff["mean"] == pytest.approx(expected, rel=1e-6, abs=1e-9), metric
        assert diff["low"] <= diff["mean"] <= diff["high"] and diff["n"] == 8
    assert compared["verdict"] in (out / "eval.md").read_text()
    assert compared["verdict"].startswith(("At equal PSNR", "The PSNRs are not equal"))


def test_figures(evaluated):
    out, _ = evaluated
    figure = Image.open(out / "figure.png")
    # 5 columns (original, masked, 2 runs, Telea) of 32 px faces shown at 128 px; smoke
    # eval.figure_rows = 4 faces, each cell a face above its zoomed hole above 3 caption lines
    # (12 px each + 2); 2 px padding, 14 px of labels.
    cell = 2 * 128 + 3 * 12 + 2
    assert figure.size == (5 * 128 + 6 * 2, 14 + 4 * cell + 5 * 2)
    pixels = torch.from_numpy(np.asarray(figure.convert("RGB")).copy())
    original_col = pixels[14 + 2:14 + 2 + 128, 2:2 + 128]
    masked_col = pixels[14 + 2:14 + 2 + 128, 2 + 130:2 + 130 + 128]
    # Masked and original agree outside the hole (centre 64x64 of the 128 cell) and differ inside.
    assert torch.equal(masked_col[:32], original_col[:32])
    assert not torch.equal(masked_col[32:96, 32:96], original_col[32:96, 32:96])
    assert (masked_col[32:96, 32:96] == 128).all()  # the hole is 0 in [-1, 1]: mid-grey
    captions = pixels[14 + 2 + 256:14 + 2 + cell, 2 + 2 * 130:2 + 2 * 130 + 128]
    assert (captions < 100).any() and (captions == 255).float().mean() > 0.7  # text on white
    losses = Image.open(out / "losses.png")
    assert losses.format == "PNG" and losses.size[0] > 600


def hole(row: dict) -> dict:
    """A row's hole metrics (without the perceptual ones, null where their weights are not staged)."""
    return {metric: row["metrics"][metric] for metric in METRICS}


def test_same_numbers_when_run_again(evaluated, tmp_path):
    out, _ = evaluated
    first = json.loads((out / "eval.json").read_text())
    hybrid = Path(first["runs"][0]["path"])
    assert main([str(hybrid), "--batch-size", "8", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    assert hole(again["runs"][0]) == pytest.approx(hole(first["runs"][0]), rel=1e-5)
    assert hole(again["runs"][1]) == pytest.approx(hole(first["runs"][2]), rel=1e-5)
    assert main([str(hybrid), "--max-batches", "1", "--batch-size", "3", "--out", str(tmp_path)]) == 0
    assert [row["n"] for row in json.loads((tmp_path / "eval.json").read_text())["runs"]] == [3, 3, 3]


def test_errors_name_the_path(evaluated, tmp_path, capsys):
    out, _ = evaluated
    empty = tmp_path / "train-empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {empty}: no generator.safetensors"]
    hybrid = out.parent / "train-hybrid"
    assert main([str(hybrid), "--shards", str(tmp_path / "noshards"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"shards folder {tmp_path / 'noshards'} not found" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_ranks_give_the_single_process_numbers(evaluated, tiny_shards, tmp_path):
    """A real 2-rank gloo run: each rank handles every other batch; the gathered means are the same."""
    out, _ = evaluated
    single = json.loads((out / "eval.json").read_text())
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    proc = run_stage("hybridgan.evaluate", [str(out.parent / "train-hybrid"), str(out.parent / "train-pathak"),
                                            "--cpu", "--batch-size", "3", "--out", str(tmp_path)],
                     launcher=launcher, timeout=240)
    assert proc.returncode == 0, failure(proc)
    double = json.loads((tmp_path / "eval.json").read_text())
    for one, two in zip(single["runs"], double["runs"]):
        assert (one["name"], one["n"]) == (two["name"], two["n"])
        # abs: a metric whose mean is near 0 (an untrained model's `detail`, a ratio of sums of signed
        # products) moves by float32 rounding (1e-8) when the batches are cut differently
        assert hole(two) == pytest.approx(hole(one), rel=1e-5, abs=1e-6)


def test_a_centre_hole_generator_is_not_evaluated_on_other_holes(tiny_shards, tmp_path, capsys):
    box = make_run(tmp_path / "t" / "train-box", tiny_shards, tmp_path, "hybrid", 0)
    cfg = tiny_config(tiny_shards, tmp_path, "mask.kind=random_box", "mask.min_box=8", "mask.max_box=16")
    save_export(build_generator(cfg).state_dict(), box / "generator.safetensors", cfg, "generator")
    centre = make_run(tmp_path / "t" / "train-centre", tiny_shards, tmp_path, "hybrid", 1)
    assert main([str(box), str(centre), "--out", str(tmp_path / "o")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: {centre / 'generator.safetensors'}: fills only a central 16x16 hole, but the "
                    f"evaluation uses mask.kind=random_box, mask.hole_size=16 (from {box / 'generator.safetensors'})")


def test_a_folder_of_photos_of_any_size(evaluated, tmp_path, capsys):
    out, _ = evaluated
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for index, (width, height) in enumerate([(40, 30), (33, 57), (128, 128), (21, 21), (64, 48)]):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(photos / f"p{index}.png")
    (photos / "readme.txt").write_text("not a photo")
    runs = [str(out.parent / "train-hybrid"), str(out.parent / "train-pathak")]
    assert main([*runs, "--photos", str(photos), "--batch-size", "2", "--out", str(tmp_path / "e")]) == 0
    results = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert results["split"] == f"photos:{photos}" and [row["n"] for row in results["runs"]] == [5, 5, 5, 5]
    assert results["comparison"]["differences"]["psnr"]["n"] == 5
    (photos / "p9.jpg").write_bytes(b"not a jpeg")
    capsys.readouterr()
    assert main([*runs, "--photos", str(photos), "--out", str(tmp_path / "f")]) == 2
    [line] = [text for text in capsys.readouterr().err.splitlines() if "error" in text]
    assert line.startswith(f"error: {photos / 'p9.jpg'}: not a readable image")
    assert not (tmp_path / "f").exists()


def test_perceptual_metrics_with_staged_weights(evaluated, standin_lpips_weights, standin_inception_weights,
                                                no_downloads, tmp_path, capsys):
    """Stand-in weights prove the plumbing: LPIPS per face into the means and the paired comparison,
    FID and KID per row as a set, strict JSON; a missing file skips its metric with one line."""
    out, _ = evaluated
    runs = [str(out.parent / "train-hybrid"), str(out.parent / "train-pathak")]
    staged = ["--lpips-weights", str(standin_lpips_weights), "--inception-weights", str(standin_inception_weights)]
    assert main([*runs, *staged, "--max-batches", "1", "--batch-size", "4", "--out", str(tmp_path / "p")]) == 0
    results = strict_json((tmp_path / "p" / "eval.json").read_text())
    assert results["perceptual"]["lpips"].startswith(f"alexnet backbone from {standin_lpips_weights}")
    assert results["perceptual"]["fid_kid"].startswith(f"InceptionV3 pool3 features from {standin_inception_weights}")
    for row in results["runs"]:
        assert row["n"] == 4 and math.isfinite(row["metrics"]["lpips"]) and row["metrics"]["lpips"] > 0
        sets = row["set_metrics"]
        assert sets["fid"] > 0 and math.isfinite(sets["kid_mean"]) and sets["kid_std"] >= 0 and sets["kid_subset"] == 2
    lpips = results["comparison"]["differences"]["lpips"]
    means = {row["name"]: row["metrics"]["lpips"] for row in results["runs"]}
    assert lpips["mean"] == pytest.approx(means["train-hybrid"] - means["train-pathak"], rel=1e-6) and lpips["n"] == 4
    table = (tmp_path / "p" / "eval.md").read_text()
    assert "| run | LPIPS | FID | KID | images |" in table and f"| {TELEA} | 0." in table
    capsys.readouterr()
    missing = tmp_path / "nowhere" / "inception.pth"
    staged[-1] = str(missing)
    assert main([*runs, *staged, "--max-batches", "1", "--batch-size", "4", "--out", str(tmp_path / "q")]) == 0
    line = (f"skipped: eval.inception_weights: {missing}: InceptionV3 weights file not found ({STAGING})")
    assert f"[evaluate] fid_kid {line}" in capsys.readouterr().out.splitlines()
    results = strict_json((tmp_path / "q" / "eval.json").read_text())
    assert results["perceptual"]["fid_kid"] == line
    for row in results["runs"]:
        assert row["set_metrics"]["fid"] is None and math.isfinite(row["metrics"]["lpips"])
        assert all(math.isfinite(v) for v in row["metrics"].values())


@pytest.mark.slow
def test_two_ranks_give_the_single_process_perceptual_numbers(evaluated, standin_lpips_weights,
                                                              standin_inception_weights, tmp_path):
    """FID and KID are set-level: both ranks' features are gathered (in face order) before they are
    computed, so 2 gloo ranks taking every other batch give the single process's numbers."""
    out, _ = evaluated
    runs = [str(out.parent / "train-hybrid"), str(out.parent / "train-pathak")]
    args = [*runs, "--cpu", "--batch-size", "3", "--lpips-weights", str(standin_lpips_weights),
            "--inception-weights", str(standin_inception_weights)]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    proc = run_stage("hybridgan.evaluate", [*args, "--out", str(tmp_path / "two")], launcher=launcher, timeout=240)
    assert proc.returncode == 0, failure(proc)
    single, double = (strict_json((tmp_path / name / "eval.json").read_text()) for name in ("one", "two"))
    for one, two in zip(single["runs"], double["runs"]):
        assert (one["name"], one["n"]) == (two["name"], two["n"]) and one["set_metrics"]["kid_subset"] == 4
        assert two["metrics"]["lpips"] == pytest.approx(one["metrics"]["lpips"], rel=1e-5)
        assert two["set_metrics"] == pytest.approx(one["set_metrics"], rel=1e-4, abs=1e-7)


def test_none_pathak_and_hybrid_are_compared_pairwise_and_the_two_questions_answered(tiny_shards, tmp_path):
    runs = tmp_path / "runs"
    stages = [make_run(runs / "t" / f"train-{kind}", tiny_shards, runs, kind, seed)
              for seed, kind in enumerate(["none", "pathak", "hybrid"])]
    assert main([*map(str, stages), "--batch-size", "4", "--out", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())
    pairs = {(c["first"], c["second"]): c for c in results["comparisons"]}
    assert list(pairs) == [("train-pathak", "train-none"), ("train-hybrid", "train-none"),
                           ("train-hybrid", "train-pathak")]
    rows = {row["name"]: row["metrics"] for row in results["runs"]}
    for (first, second), pair in pairs.items():
        gap = pair["differences"]["hf_gap"]
        assert gap["low"] <= gap["mean"] <= gap["high"] and gap["n"] == results["runs"][0]["n"]
        artefacts = (rows[first]["checkerboard"] > rows[first]["checkerboard_ref"]
                     or rows[first]["edge_jump"] > 1.5 * rows[first]["edge_jump_ref"])
        expected = ("blurrier" if gap["low"] > 0 else "no different" if gap["high"] >= 0
                    else "sharper with artefacts" if artefacts else "sharper")
        assert pair["outcome"] == expected and pair["verdict"].startswith(f"The {first} fill")
        assert pair["differences"]["psnr"]["mean"] == pytest.approx(rows[first]["psnr"] - rows[second]["psnr"], abs=1e-4)
    assert set(results["answers"]) == {"does any discriminator beat no discriminator?", "does the hybrid beat Pathak's?"}
    text = (tmp_path / "eval" / "eval.md").read_text()
    assert "**does any discriminator beat no discriminator?**" in text
    with Image.open(tmp_path / "eval" / "figure.png") as figure:  # original | masked | 3 runs | Telea
        assert figure.width >= 6 * 128
