"""DeepSpeed ZeRO-2 through Accelerate, two real CPU processes, G and D each under its own engine:
the DDP path's objective (no clipping unless `grad_clip`), bf16, and resume of both engines."""

from __future__ import annotations

import sys

import pytest
from safetensors.torch import load_file

from conftest import tiny_args, tiny_config
from hybridgan import train as train_module
from hybridgan.config import save_config
from hybridgan.export import main as export_main
from hybridgan.session import TrainingError, require_deepspeed
from hybridgan.train import EXPORT_NAME
from stage_runs import (ACCELERATE, assert_same_weights, failure, free_port, kill_after_checkpoint, latest_step,
                        launches, read_records, run_stage)


def deepspeed_2_ranks(precision: str = "no") -> list[str]:
    return [*ACCELERATE, "--use_deepspeed", "--zero_stage", "2", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", precision, "--main_process_port", str(free_port())]


BASE = ["train.max_steps=6", "train.checkpoint_every=2", "train.batch_size=4", "discriminator.from_scratch=true"]


@pytest.mark.slow
def test_gan_training_under_deepspeed_zero2_with_one_engine_per_model_resumes_both_after_a_kill(tiny_shards, tmp_path):
    result = run_stage("hybridgan.train", tiny_args(tiny_shards, tmp_path, "run.name=whole", *BASE),
                       launcher=deepspeed_2_ranks())
    assert result.returncode == 0, failure(result)
    reference = tmp_path / "whole" / "train-hybrid"
    [launch] = launches(reference)
    assert launch["world_size"] == 2 and launch["distributed_type"].endswith("DEEPSPEED")
    assert launch["batch_size_per_rank"] == 2
    checkpoint = reference / "checkpoints" / "step-00000006"
    assert (checkpoint / "pytorch_model").is_dir() and (checkpoint / "pytorch_model_1").is_dir()
    records = read_records(reference, "train")
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(0 < r["gen_pixel_loss"] < 10 and 0 <= r["disc_loss"] < 1 for r in records)
    exported = load_file(str(reference / EXPORT_NAME))
    assert exported and all(t.isfinite().all() for t in exported.values())

    # the same run killed after a checkpoint and re-run: both engines resume to the same weights
    args = tiny_args(tiny_shards, tmp_path, "run.name=killed", *BASE)
    stage = tmp_path / "killed" / "train-hybrid"
    kill_after_checkpoint("hybridgan.train", args, stage, min_step=2, launcher=deepspeed_2_ranks())
    interrupted_at = latest_step(stage)
    assert 2 <= interrupted_at < 6
    resumed = run_stage("hybridgan.train", args, launcher=deepspeed_2_ranks())
    assert resumed.returncode == 0, failure(resumed)
    assert [r["start_step"] for r in launches(stage)] == [0, interrupted_at]
    assert_same_weights(reference / EXPORT_NAME, stage / EXPORT_NAME)
    later = [r for r in records if r["step"] > interrupted_at]
    assert later and later == [r for r in read_records(stage, "train") if r["step"] > interrupted_at]


@pytest.mark.slow
def test_bf16_zero2_steps_give_finite_float32_losses_without_deepspeed_noise(tiny_shards, tmp_path):
    args = tiny_args(tiny_shards, tmp_path, "train.max_steps=2", "train.log_every=1", "train.batch_size=4",
                     "train.mixed_precision=bf16", "discriminator.from_scratch=true")
    result = run_stage("hybridgan.train", args, launcher=deepspeed_2_ranks("bf16"))
    assert result.returncode == 0, failure(result)
    stage = tmp_path / "t" / "train-hybrid"
    [launch] = launches(stage)
    assert launch["world_size"] == 2 and launch["mixed_precision"] == "bf16"
    records = read_records(stage, "train")
    assert [r["step"] for r in records] == [1, 2]
    assert all(isinstance(r[k], float) and 0 <= r[k] < 10 for r in records for k in ("gen_loss", "disc_loss"))
    # the launcher may say it once before the ranks start; the ranks (DS_ACCELERATOR=cpu) stay silent
    # instead of writing into the progress bar
    warning = result.stderr.find("Setting accelerator to CPU")
    assert result.stderr.count("Setting accelerator to CPU") <= 1 and warning < result.stderr.find("train-hybrid:")


def test_a_deepspeed_launch_without_deepspeed_installed_is_one_line_naming_the_extra(tiny_shards, tmp_path,
                                                                                     monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what an environment without it finds
    with pytest.raises(SystemExit) as exit_:
        train_module.main(tiny_args(tiny_shards, tmp_path, "discriminator.from_scratch=true"))
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: the launch asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true), and deepspeed is not installed: "
        "pip install 'hybridgan[deepspeed]'")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(TrainingError, match=r"and deepspeed and transformers are not installed: pip install"):
        require_deepspeed(("gen", "disc"))


def test_exporting_a_deepspeed_checkpoint_without_deepspeed_installed_names_the_extra(tmp_path, monkeypatch, capsys):
    stage = tmp_path / "run" / "train-hybrid"
    engine = stage / "checkpoints" / "step-00000002" / "pytorch_model"
    engine.mkdir(parents=True)
    (stage / "checkpoints" / "latest").write_text("step-00000002")
    save_config(tiny_config(tmp_path, tmp_path), stage / "config.yaml")
    # DeepSpeed absent, also when an earlier test of this process imported its submodules
    for name in ["deepspeed", *(name for name in sys.modules if name.startswith("deepspeed."))]:
        monkeypatch.setitem(sys.modules, name, None)
    assert export_main([str(stage)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {engine}: a DeepSpeed checkpoint, and DeepSpeed is not "
                                               f"installed: pip install 'hybridgan[deepspeed]'")
