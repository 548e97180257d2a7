"""jobs.submit without a cluster: the chain's dependencies, its commands, the checkpointable wrapper."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import submitit

from hybridgan.config import load_config
from jobs.submit import StageJob, StageStopped, chain_dependencies, selected_stages, stage_table

REPO = Path(__file__).resolve().parents[1]


def test_chain_dependencies() -> None:
    stages = selected_stages("chain", load_config(REPO / "configs/smoke-cpu.yaml"))
    assert chain_dependencies(stages) == {
        "pack": [],
        "pretrain": ["pack"],
        "train-hybrid": ["pretrain"],
        "train-pathak": ["pack"],
        "evaluate": ["train-hybrid", "train-pathak"],
    }
    # One stage alone waits for nothing; `train` follows discriminator.kind.
    pathak = load_config(REPO / "configs/smoke-cpu.yaml", ["discriminator.kind=pathak"])
    assert selected_stages("train", pathak) == ["train-pathak"]
    assert chain_dependencies(["train-pathak"]) == {"train-pathak": []}


def test_stage_commands_go_through_jobs_launch(tmp_path) -> None:
    cfg = load_config(REPO / "configs/smoke-cpu.yaml", [f"run.root={tmp_path}"])
    table = stage_table(tmp_path / "submit.yaml", cfg, gpus_per_node=0, cpus=6)
    launch = [sys.executable, "-m", "jobs.launch", "-m"]
    assert table["pack"][:3] == [sys.executable, "-m", "hybridgan.pack"] and table["pack"][-2:] == ["--workers", "6"]
    assert table["pretrain"] == [*launch, "hybridgan.pretrain", "--config", str(tmp_path / "submit.yaml")]
    assert table["train-hybrid"][: len(launch) + 1] == [*launch, "hybridgan.train"]
    assert f"discriminator.pretrained={tmp_path}/smoke/pretrain/discriminator.safetensors" in table["train-hybrid"]
    assert "discriminator.kind=pathak" in table["train-pathak"]
    assert table["evaluate"][-1] == "--cpu"


def test_stage_job_exit_codes(tmp_path) -> None:
    assert StageJob("ok", [sys.executable, "-c", "pass"], str(tmp_path))() == "ok"
    with pytest.raises(RuntimeError, match="stage bad failed with exit code 3"):
        StageJob("bad", [sys.executable, "-c", "raise SystemExit(3)"], str(tmp_path))()
    with pytest.raises(StageStopped, match="checkpointed and stopped"):
        StageJob("stop", [sys.executable, "-c", "raise SystemExit(75)"], str(tmp_path))()


def test_stage_job_sees_its_environment(tmp_path) -> None:
    job = StageJob("env", [sys.executable, "-c", "import os; open('gpus', 'w').write(os.environ['GPUS_PER_NODE'])"],
                   str(tmp_path), {"GPUS_PER_NODE": "8"})
    job()
    assert (tmp_path / "gpus").read_text() == "8"


def test_checkpoint_resubmits_the_same_command(tmp_path) -> None:
    job = StageJob("train-hybrid", ["python", "-m", "hybridgan.train"], str(tmp_path), {"A": "1"})
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    again = delayed.function
    assert isinstance(again, StageJob) and again is not job
    assert (again.name, again.command, again.cwd, again.env) == (job.name, job.command, job.cwd, job.env)


def test_evaluate_runs_on_one_gpu_whatever_training_uses():
    from jobs.submit import stage_env

    env = {"GPUS_PER_NODE": "8", "ACCELERATE_CONFIG": "configs/accelerate/multi-gpu.yaml"}
    assert stage_env("evaluate", env) == {"GPUS_PER_NODE": "1", "ACCELERATE_CONFIG": ""}
    assert stage_env("train-hybrid", env) == env
    assert stage_env("evaluate", {"GPUS_PER_NODE": "0", "ACCELERATE_CONFIG": ""})["GPUS_PER_NODE"] == "0"
