"""Numerical agreement of the fast paths with the plain one, from the same weights and data (same
seed), through the real stage command: bf16 autocast vs fp32, torch.compile vs eager."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_args
from hybridgan.inpaint import load_generator
from stage_runs import failure, read_records, run_stage

ONE_STEP = ["train.max_steps=1", "train.log_every=1", "discriminator.from_scratch=true", "train.eval_every=0"]
# the probability objective: an untrained U-Net's raw per-pixel scores are large, and their squares
# (lsgan) turn bf16's few-1e-3 relative errors into ~20 % of disc_loss at step 1 (d_real, d_fake
# themselves agree within 10 %); the sigmoid bounds them, which is what this comparison needs
PRECISION_STEP = [*ONE_STEP, "loss.adversarial=sigmoid_l2"]


@pytest.mark.slow
def test_one_bf16_step_agrees_with_fp32(tiny_shards, tmp_path):
    losses = {}
    for precision in ("no", "bf16"):
        args = tiny_args(tiny_shards, tmp_path, f"run.name=run-{precision}", f"train.mixed_precision={precision}",
                         *PRECISION_STEP)
        result = run_stage("hybridgan.train", args)
        assert result.returncode == 0, failure(result)
        [record] = read_records(tmp_path / f"run-{precision}" / "train-hybrid", "train")
        losses[precision] = record
    fp32, bf16 = losses["no"], losses["bf16"]
    assert fp32 != bf16, "bf16 made no difference: autocast is not on"
    # bf16 keeps 8 bits of mantissa: a relative error of a few 1e-3 per op, up to ~5 % through two
    # untrained networks (measured here: d_fake 5.4 %). Compared: what both runs compute from the
    # same weights (D phase, and G's pixel loss: G has not been updated yet). Not compared:
    # gen_adv_loss, judged by the D that one Adam step just changed; Adam's first step is about
    # lr * sign(gradient), so bf16's gradient noise flips whole updates (measured: 6 % to 17 %).
    for name in ("disc_loss", "d_real", "d_fake", "gen_pixel_loss"):
        assert bf16[name] == pytest.approx(fp32[name], rel=0.1, abs=0.01), name


@pytest.mark.slow
def test_two_compiled_steps_agree_with_eager(tiny_shards, tmp_path):
    """torch.compile (inductor, on the CPU here) of G and D: the same losses to float32 rounding.
    Pathak's D keeps the compile time of this test under a minute."""
    records = {}
    for compiled in ("false", "true"):
        args = tiny_args(tiny_shards, tmp_path, f"run.name=compile-{compiled}", f"train.compile={compiled}",
                         "discriminator.kind=pathak", "train.max_steps=2", "train.log_every=1", "train.eval_every=0")
        result = run_stage("hybridgan.train", args)
        assert result.returncode == 0, failure(result)
        records[compiled] = read_records(tmp_path / f"compile-{compiled}" / "train-pathak", "train")
    assert [r["step"] for r in records["true"]] == [1, 2]
    model, _ = load_generator(tmp_path / "compile-true" / "train-pathak" / "generator.safetensors", torch.device("cpu"))
    assert not any("_orig_mod" in key for key in model.state_dict())
    for eager, compiled in zip(records["false"], records["true"]):
        for name in ("disc_loss", "d_real", "d_fake", "gen_pixel_loss", "gen_adv_loss"):
            assert compiled[name] == pytest.approx(eager[name], rel=1e-4), name


@pytest.mark.slow
def test_the_launchers_mixed_precision_is_honoured_for_auto_and_a_contradiction_is_one_line(tiny_shards, tmp_path):
    """`accelerate launch --mixed_precision bf16` trains in bf16 when the stage key is `auto`; with
    the stage key `no` the stage stops before training, naming both."""
    from stage_runs import ACCELERATE, launches

    launcher = [*ACCELERATE, "--quiet", "--num_processes", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    args = tiny_args(tiny_shards, tmp_path, "train.mixed_precision=auto", *ONE_STEP)
    result = run_stage("hybridgan.train", args, launcher=launcher)
    assert result.returncode == 0, failure(result)
    assert [launch["mixed_precision"] for launch in launches(tmp_path / "t" / "train-hybrid")] == ["bf16"]

    args = tiny_args(tiny_shards, tmp_path, "run.name=refused", "train.mixed_precision=no", *ONE_STEP)
    result = run_stage("hybridgan.train", args, launcher=launcher)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: train.mixed_precision=no and the launcher's --mixed_precision bf16 (ACCELERATE_MIXED_PRECISION) "
        "disagree: set train.mixed_precision=bf16 or auto, or launch without --mixed_precision")
    assert not (tmp_path / "refused" / "train-hybrid" / "launches.jsonl").exists()
