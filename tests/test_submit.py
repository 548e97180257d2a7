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
        "train-none": ["pack"],
        "evaluate": ["train-hybrid", "train-pathak", "train-none"],
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


def test_jobs_ask_for_the_cpus_of_their_loader_workers(tmp_path) -> None:
    from jobs.submit import _parser, executor_for, stage_cpus

    cfg = load_config(REPO / "configs/paper.yaml", [f"run.root={tmp_path}"])  # data.workers 8, pack.workers 8
    assert stage_cpus("train-hybrid", cfg, 8) == 72 and stage_cpus("pretrain", cfg, 4) == 36
    assert stage_cpus("train-pathak", cfg, 0) == 9 and stage_cpus("evaluate", cfg, 8) == 9
    assert stage_cpus("pack", cfg, 8) == 8 and stage_cpus("report", cfg, 8) == 1
    assert stage_cpus("train-hybrid", cfg, 8, override=16) == 16

    def rendered(*argv: str, stage: str = "train-hybrid") -> str:
        args = _parser().parse_args(["chain", *argv])
        executor = executor_for(args, cfg, tmp_path / "submitit", stage)
        return executor._executor._make_submission_file_text("python -m x", "uid")

    text = rendered("--gpus-per-node", "8", "--nodes", "4")
    assert "#SBATCH --cpus-per-task=72\n" in text and "#SBATCH --nodes=4\n" in text
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "--cpus-per-task 72" in srun  # Slurm >= 22.05: srun does not inherit it
    assert "#SBATCH --cpus-per-task=8\n" in rendered("--gpus-per-node", "8", stage="pack")
    assert "#SBATCH --cpus-per-task=5\n" in rendered("--gpus-per-node", "8", "--cpus-per-task", "5")


def test_help_describes_the_command_in_whole_sentences() -> None:
    from jobs.submit import _parser

    description = _parser().description
    assert description.startswith("Submit one stage or the whole chain") and description.endswith("on this machine.")


def test_a_gpu_config_gets_the_templates_gpus_and_stays_on_gpus(tmp_path) -> None:
    from jobs.submit import resolve_config, template_gpus, training_gpus

    assert template_gpus() == 8
    for name in ("train", "pretrain"):
        assert "#SBATCH --gpus-per-node=8\n" in (REPO / "slurm" / f"{name}.sbatch").read_text()
    paper = resolve_config("configs/paper.yaml", [f"run.root={tmp_path}"], "/data/celeba-hq", cpu=False)
    assert (paper.pretrain.cpu, paper.train.cpu) == (False, False)
    assert training_gpus(paper, "configs/paper.yaml", None) == 8
    assert training_gpus(paper, "configs/paper.yaml", 4) == 4
    smoke = resolve_config("configs/smoke-cpu.yaml", [], None, cpu=False)
    assert training_gpus(smoke, "configs/smoke-cpu.yaml", None) == 0
    forced = resolve_config("configs/paper.yaml", [], None, cpu=True)
    assert (forced.pretrain.cpu, forced.train.cpu) == (True, True)
    assert training_gpus(forced, "configs/paper.yaml", None) == 0


@pytest.mark.parametrize("argv, message", [
    (["--config", "configs/paper.yaml", "--gpus-per-node", "0"],
     "submit: --gpus-per-node 0: configs/paper.yaml trains on GPUs (pretrain.cpu=False, train.cpu=False); "
     "pass --cpu to train on CPUs, or ask for GPUs"),
    (["--config", "configs/smoke-cpu.yaml", "--gpus-per-node", "8"],
     "submit: --gpus-per-node 8: configs/smoke-cpu.yaml trains on the CPU (pretrain.cpu=true, train.cpu=true); "
     "drop --gpus-per-node or override pretrain.cpu=false train.cpu=false"),
    (["--cpu", "--gpus-per-node", "8"], "submit: --cpu and --gpus-per-node 8: choose one"),
    (["--slurm-arg=--qos=high"], "submit: --slurm-arg '--qos=high': expected KEY=VALUE or KEY, an sbatch long "
                                    "option without its dashes (e.g. qos=high, mem=64G, exclusive)"),
    (["--slurm-arg", "mem="], "submit: --slurm-arg 'mem=': expected KEY=VALUE or KEY, an sbatch long option "
                              "without its dashes (e.g. qos=high, mem=64G, exclusive)"),
    (["--cluster", "local", "--slurm-arg", "qos=high"], "submit: --slurm-arg qos=high: sbatch options need --cluster slurm"),
])
def test_contradictory_gpu_or_slurm_arguments_are_one_line_before_anything_is_written(tmp_path, argv, message) -> None:
    from jobs.submit import main

    with pytest.raises(SystemExit) as refused:
        main(["chain", *argv, f"run.root={tmp_path}"])
    assert str(refused.value) == message
    assert list(tmp_path.iterdir()) == []


def test_slurm_args_reach_every_jobs_sbatch_lines_over_the_defaults(tmp_path) -> None:
    from jobs.submit import _parser, executor_for

    cfg = load_config(REPO / "configs/paper.yaml", [f"run.root={tmp_path}"])
    args = _parser().parse_args(["chain", "--gpus-per-node", "8", "--slurm-arg", "qos=high", "--slurm-arg", "mem=64G",
                                 "--slurm-arg", "constraint=a100", "--slurm-arg", "requeue",
                                 "--slurm-arg", "kill-on-invalid-dep=no"])
    for stage in ("pack", "train-hybrid", "evaluate", "report"):
        text = executor_for(args, cfg, tmp_path / "submitit", stage)._executor._make_submission_file_text("x", "uid")
        lines = text.splitlines()
        for line in ("#SBATCH --qos=high", "#SBATCH --mem=64G", "#SBATCH --constraint=a100", "#SBATCH --requeue",
                     "#SBATCH --kill-on-invalid-dep=no"):
            assert line in lines, (stage, line)
        assert "#SBATCH --kill-on-invalid-dep=yes" not in lines
    train = executor_for(args, cfg, tmp_path / "submitit", "train-hybrid")._executor._make_submission_file_text("x", "u")
    assert "#SBATCH --gpus-per-node=8" in train.splitlines()


def test_the_paper_chain_submits_gpu_jobs_with_no_cpu_override(tmp_path, monkeypatch) -> None:
    """`jobs.submit chain --config configs/paper.yaml --data ... --cluster slurm`: every training job
    asks for the templates' 8 GPUs per node, and nothing moves a stage to the CPU."""
    from jobs.submit import main

    submitted = {}

    def record(executor, function, *args):
        name = function.name if isinstance(function, StageJob) else "report"
        submitted[name] = (executor._executor._make_submission_file_text("x", "uid").splitlines(), function)
        return type("Job", (), {"job_id": str(len(submitted))})()

    monkeypatch.setattr(submitit.AutoExecutor, "submit", record)
    main(["chain", "--config", "configs/paper.yaml", "--data", "/data/celeba-hq", "--cluster", "slurm",
          f"run.root={tmp_path}"])
    for stage in ("pretrain", "train-hybrid", "train-pathak", "train-none"):
        lines, job = submitted[stage]
        assert "#SBATCH --gpus-per-node=8" in lines and "#SBATCH --exclusive" in lines, stage
        assert job.env["GPUS_PER_NODE"] == "8" and not any("cpu=true" in arg for arg in job.command), stage
    assert "#SBATCH --gpus-per-node=1" in submitted["evaluate"][0] and "--cpu" not in submitted["evaluate"][1].command
    saved = load_config(tmp_path / "paper" / "submit.yaml")
    assert (saved.pretrain.cpu, saved.train.cpu, saved.data.source) == (False, False, "/data/celeba-hq")
