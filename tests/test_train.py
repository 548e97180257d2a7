"""GAN training: learning, both discriminators, phase isolation, resume, 2 ranks, TensorBoard."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, SMOKE, tiny_args, tiny_config
from hybridgan.data.loader import make_loader
from hybridgan.data.masks import apply_mask, make_masks
from hybridgan.exports import ExportError
from hybridgan.metrics import HoleMetrics, mean_fill
from hybridgan.pretrain import EXPORT_NAME as DISC_EXPORT, pretrain
from hybridgan.session import TrainingError, TrainingSession
from hybridgan.train import EXPORT_NAME, GanTraining, train
from stage_runs import (accelerate_2_ranks, assert_same_weights, kill_after_checkpoint, latest_step,
                        launches, read_records, run_stage, stage_env)

TABLE2 = ("gen_adv_loss", "gen_pixel_loss", "disc_loss")
LEARN = ["train.epochs=6", "train.eval_every=8", "train.eval_batches=0", "train.checkpoint_every=100", "train.lr=0.002"]


@pytest.fixture(scope="module")
def pretrained(tiny_shards, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    return pretrain(tiny_config(tiny_shards, runs, "pretrain.max_steps=4"))


@pytest.fixture(scope="module")
def hybrid_run(tiny_shards, pretrained):
    cfg = tiny_config(tiny_shards, pretrained.parents[2], *LEARN, f"discriminator.pretrained={pretrained}")
    return cfg, train(cfg).parent


def test_pixel_loss_falls_and_the_fill_beats_the_mean_colour(hybrid_run):
    cfg, stage = hybrid_run
    epochs = read_records(stage, "epoch")
    assert len(epochs) == 6 and set(TABLE2) <= set(epochs[0])
    assert epochs[-1]["gen_pixel_loss"] < 0.6 * epochs[0]["gen_pixel_loss"]
    val = read_records(stage, "val")[-1]
    baseline = HoleMetrics()
    for batch in make_loader(cfg, "val", batch_size=8):
        mask = make_masks(cfg.mask, cfg.data.image_size, batch["image"].shape[0])
        baseline.update(mean_fill(apply_mask(batch["image"], mask), mask), batch["image"], mask)
    assert val["psnr"] > baseline.compute()["psnr"] + 0.5
    assert 0 < val["ssim"] <= 1 and val["sharpness"] > 0


def test_tensorboard_holds_table2_validation_metrics_and_grids(hybrid_run):
    _, stage = hybrid_run
    events = EventAccumulator(str(stage / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {f"epoch/{name}" for name in TABLE2} <= scalars
    assert {"val/psnr", "val/ssim", "val/l1", "val/sharpness", "train/d_real", "train/d_fake"} <= scalars
    logged = [e.value for e in events.Scalars("epoch/gen_pixel_loss")]
    assert logged == pytest.approx([r["gen_pixel_loss"] for r in read_records(stage, "epoch")], rel=1e-6)
    grid = events.Images("val/masked_inpainted_original")[-1]
    assert grid.width == 3 * 32 + 4 * 2


def test_pathak_baseline_trains_without_any_pretraining_export(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path, "discriminator.kind=pathak", "discriminator.pretrained=''",
                      "train.max_steps=4")
    export = train(cfg)
    assert export.parent.name == "train-pathak"
    records = read_records(export.parent, "train")
    assert records and all(math.isfinite(r["disc_loss"]) for r in records)


def test_missing_pretraining_export_is_one_clear_error(tiny_shards, tmp_path):
    missing = tmp_path / "nowhere" / DISC_EXPORT
    result = run_stage("hybridgan.train", tiny_args(tiny_shards, tmp_path, f"discriminator.pretrained={missing}"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {missing}: pretraining export not found; run `python -m hybridgan.pretrain` with this "
        f"config first, or set discriminator.from_scratch=true")
    default = tmp_path / "empty" / "pretrain" / DISC_EXPORT
    with pytest.raises(ExportError, match=f"^{default}: pretraining export not found"):
        train(tiny_config(tiny_shards, tmp_path, "run.name=empty", "discriminator.pretrained=''"))


def test_each_phase_changes_only_its_own_network(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path, "discriminator.from_scratch=true")
    job = GanTraining(cfg, TrainingSession(cfg, "train-hybrid", cfg.train))
    batch = next(iter(make_loader(cfg, "train", batch_size=8)))
    real = batch["image"]
    mask = job.masks(real.shape[0])
    masked = apply_mask(real, mask)

    def snapshot(module):
        return [p.detach().clone() for p in module.parameters()]

    gen_before, disc_before = snapshot(job.gen), snapshot(job.disc)
    job.discriminator_step(real, masked, mask)
    assert all(torch.equal(a, b) for a, b in zip(gen_before, snapshot(job.gen)))
    assert not all(torch.equal(a, b) for a, b in zip(disc_before, snapshot(job.disc)))
    disc_after_d = snapshot(job.disc)
    job.generator_step(real, masked, mask)
    assert all(torch.equal(a, b) for a, b in zip(disc_after_d, snapshot(job.disc)))
    assert not all(torch.equal(a, b) for a, b in zip(gen_before, snapshot(job.gen)))
    assert all(p.requires_grad for p in job.disc.parameters())


def test_sigkill_then_rerun_finishes_with_the_uninterrupted_generator(tiny_shards, tmp_path):
    base = ["train.epochs=2", "train.checkpoint_every=3", "discriminator.from_scratch=true", "train.eval_every=4"]
    whole = run_stage("hybridgan.train", tiny_args(tiny_shards, tmp_path, "run.name=whole", *base))
    assert whole.returncode == 0, whole.stderr
    args = tiny_args(tiny_shards, tmp_path, "run.name=killed", *base)
    stage = tmp_path / "killed" / "train-hybrid"
    kill_after_checkpoint("hybridgan.train", args, stage, min_step=3)
    interrupted_at = latest_step(stage)
    resumed = run_stage("hybridgan.train", args)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["start_step"] for r in launches(stage)] == [0, interrupted_at]
    reference = tmp_path / "whole" / "train-hybrid"
    assert_same_weights(reference / EXPORT_NAME, stage / EXPORT_NAME)
    assert [r["step"] for r in read_records(stage, "epoch")] == [8, 16]
    assert read_records(stage, "epoch") == read_records(reference, "epoch")


def test_two_real_processes_sync_both_models_on_disjoint_samples(tiny_shards, tmp_path):
    overrides = tiny_args(tiny_shards, tmp_path)[2:]
    probe = [*accelerate_2_ranks(), str(REPO / "tests" / "ddp_probe.py"), str(tmp_path), "--config", str(SMOKE),
             *overrides]
    result = subprocess.run(probe, cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"]) and len(ranks[0]["keys"]) == 8
    for name in ("pretrain_disc", "gen", "disc"):
        assert ranks[0][name] == ranks[1][name], f"{name} differs across ranks"
    assert ranks[0]["changed"] == [True, True]


def test_two_process_training_writes_from_rank0_only(tiny_shards, tmp_path):
    args = tiny_args(tiny_shards, tmp_path, "train.max_steps=4", "discriminator.from_scratch=true")
    result = run_stage("hybridgan.train", args, launcher=accelerate_2_ranks())
    assert result.returncode == 0, result.stderr[-3000:]
    stage = tmp_path / "t" / "train-hybrid"
    assert launches(stage)[0]["world_size"] == 2
    assert len(list((stage / "tb").glob("events.out.tfevents.*"))) == 1
    assert result.stdout.count("training done") == 1
    assert (stage / EXPORT_NAME).is_file()


def test_a_nan_loss_stops_naming_step_and_loss_and_keeps_the_last_good_checkpoint(tiny_shards, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_shards, tmp_path, "discriminator.kind=pathak", "train.checkpoint_every=3", "train.epochs=2")
    honest_step = GanTraining.generator_step

    def poisoned_step(self, real, masked, mask):
        losses = honest_step(self, real, masked, mask)
        if self.session.state.step == 4:  # the 5th step, counted from 0 before it ends
            losses["gen_pixel_loss"] = torch.tensor(float("nan"))
        return losses

    monkeypatch.setattr(GanTraining, "generator_step", poisoned_step)
    with pytest.raises(TrainingError) as err:
        train(cfg)
    stage = tmp_path / "t" / "train-pathak"
    assert str(err.value) == (f"step 5: gen_pixel_loss is nan; stopped, the last good checkpoint "
                              f"{stage / 'checkpoints' / 'step-00000003'} is kept")
    assert latest_step(stage) == 3
    assert all(math.isfinite(r["gen_pixel_loss"]) for r in read_records(stage, "train"))
