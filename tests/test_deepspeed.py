"""DeepSpeed ZeRO-2 through Accelerate, two real CPU processes, G and D each under its own engine."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from conftest import tiny_args
from hybridgan.train import EXPORT_NAME
from stage_runs import ACCELERATE, free_port, launches, read_records, run_stage



def deepspeed_2_ranks() -> list[str]:
    return [*ACCELERATE, "--use_deepspeed", "--zero_stage", "2", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(free_port())]


@pytest.mark.slow
def test_gan_training_under_deepspeed_zero2_with_one_engine_per_model(tiny_shards, tmp_path):
    args = tiny_args(tiny_shards, tmp_path, "train.max_steps=4", "train.checkpoint_every=2", "train.batch_size=4",
                     "discriminator.from_scratch=true")
    result = run_stage("hybridgan.train", args, launcher=deepspeed_2_ranks())
    assert result.returncode == 0, result.stderr[-3000:]
    stage = tmp_path / "t" / "train-hybrid"
    [launch] = launches(stage)
    assert launch["world_size"] == 2 and launch["distributed_type"].endswith("DEEPSPEED")
    checkpoint = stage / "checkpoints" / "step-00000004"
    assert (checkpoint / "pytorch_model").is_dir() and (checkpoint / "pytorch_model_1").is_dir()
    records = read_records(stage, "train")
    assert [r["step"] for r in records] == [2, 4]
    assert all(0 < r["gen_pixel_loss"] < 10 and 0 <= r["disc_loss"] < 1 for r in records)
    exported = load_file(str(stage / EXPORT_NAME))
    assert exported and all(t.isfinite().all() for t in exported.values())
