"""The multi-node `accelerate launch` line rendered by jobs.launch (no Slurm needed), and two
machines started through it on this host, as srun starts one task per node."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobs.launch import accelerate_command, job_port

REPO = Path(__file__).resolve().parents[1]


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_four_nodes_of_eight_gpus() -> None:
    cmd = accelerate_command(
        nnodes=4, node_rank=2, main_ip="gpu01", port=29517, gpus_per_node=8,
        module="hybridgan.train", args=["--config", "configs/paper.yaml", "run.name=big"],
        accelerate_config="configs/accelerate/multi-node.yaml",
    )
    assert cmd[:3] == ["accelerate", "launch", "--quiet"]
    assert _flag(cmd, "--config_file") == "configs/accelerate/multi-node.yaml"
    assert _flag(cmd, "--num_processes") == "32"
    assert _flag(cmd, "--num_machines") == "4"
    assert _flag(cmd, "--machine_rank") == "2"
    assert _flag(cmd, "--main_process_ip") == "gpu01"
    assert _flag(cmd, "--main_process_port") == "29517"
    # The config file decides the distributed type; the module and its arguments come last, intact.
    assert "--multi_gpu" not in cmd and "--mixed_precision" not in cmd
    assert cmd[-5:] == ["-m", "hybridgan.train", "--config", "configs/paper.yaml", "run.name=big"]


def test_multi_node_without_config_file_is_multi_gpu() -> None:
    cmd = accelerate_command(4, "$SLURM_NODEID", "gpu01", 29500, 8, "hybridgan.pretrain", [])
    assert cmd == [
        "accelerate", "launch", "--quiet", "--multi_gpu", "--num_processes", "32", "--num_machines", "4",
        "--machine_rank", "$SLURM_NODEID", "--main_process_ip", "gpu01", "--main_process_port", "29500",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hybridgan.pretrain",
    ]


def test_cpu_mode_is_one_process_on_one_machine() -> None:
    cmd = accelerate_command(1, 0, "vm", 29500, 0, "hybridgan.train", ["train.cpu=true"])
    assert cmd == [
        "accelerate", "launch", "--quiet", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hybridgan.train", "train.cpu=true",
    ]


def test_bad_topology_is_rejected() -> None:
    with pytest.raises(ValueError, match="nnodes=0"):
        accelerate_command(0, 0, "x", 1, 8, "m", [])


def test_port_follows_job_id() -> None:
    assert job_port("123456") == 29500 + 456
    assert job_port(None) == 29500


def test_cli_reads_slurm_variables(tmp_path) -> None:
    env = {
        "PATH": "/usr/bin:/bin", "SLURM_NNODES": "4", "SLURM_NODEID": "3", "SLURM_JOB_ID": "1042",
        "GPUS_PER_NODE": "8",
    }
    out = subprocess.run(
        [sys.executable, "-m", "jobs.launch", "--dry-run", "--main-ip", "gpu07", "-m",
         "hybridgan.train", "--config", "c.yaml"],
        env=env, cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    assert out.strip() == (
        "[launch] node 3/4: accelerate launch --quiet --multi_gpu --num_processes 32 --num_machines 4 "
        "--machine_rank 3 --main_process_ip gpu07 --main_process_port 29542 --mixed_precision no "
        "--dynamo_backend no -m hybridgan.train --config c.yaml"
    )


def test_cli_missing_accelerate_config_is_one_line(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.launch", "--dry-run", "--accelerate-config",
         str(tmp_path / "nope.yaml"), "-m", "m"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"launch: ACCELERATE_CONFIG={tmp_path / 'nope.yaml'}: file not found"


def test_task_cpus_rule_is_the_same_in_python_and_the_templates() -> None:
    from jobs.launch import task_cpus

    assert task_cpus(8, 8) == 72 and task_cpus(0, 2) == 3 and task_cpus(1, 0) == 1
    grid = [(g, w) for g in (0, 1, 4, 8) for w in (0, 1, 8)]
    script = "source slurm/common.sh; " + "; ".join(f"hg_task_cpus {g} {w}" for g, w in grid)
    out = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "HYBRIDGAN_ROOT": str(REPO)}).stdout.split()
    assert [int(n) for n in out] == [task_cpus(g, w) for g, w in grid]
    with pytest.raises(ValueError, match="loader_workers=-1"):
        task_cpus(8, -1)


def test_templates_ask_for_the_cpus_of_the_paper_config_and_pass_them_to_srun() -> None:
    from hybridgan.config import load_config
    from jobs.launch import task_cpus

    paper = load_config(REPO / "configs/paper.yaml")
    for name in ("train", "pretrain"):
        text = (REPO / "slurm" / f"{name}.sbatch").read_text()
        assert f"#SBATCH --cpus-per-task={task_cpus(8, paper.data.workers)}\n" in text
        assert "#SBATCH --gpus-per-node=8\n" in text
    evaluate = (REPO / "slurm" / "evaluate.sbatch").read_text()
    assert f"#SBATCH --cpus-per-task={task_cpus(1, paper.data.workers)}\n" in evaluate
    assert 'srun --ntasks-per-node=1 --cpus-per-task="$cpus"' in (REPO / "slurm" / "common.sh").read_text()


def test_a_node_list_outside_slurm_is_one_line_naming_scontrol(tmp_path) -> None:
    env = {"PATH": str(tmp_path), "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2"}
    proc = subprocess.run([sys.executable, "-m", "jobs.launch", "--dry-run", "-m", "hybridgan.train"],
                          env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == ("launch: SLURM_JOB_NODELIST=gpu[01-02] needs scontrol to find the main node, and "
                           "scontrol is not on PATH: run inside the Slurm job, or pass --main-ip HOST\n")
    assert proc.stdout == ""


@pytest.mark.slow
def test_two_machines_through_jobs_launch_train_checkpoint_and_resume_on_one(tiny_shards, tmp_path) -> None:
    """Two `jobs.launch` processes with the Slurm variables of node 0 and node 1 of a 2-node job
    (one CPU process per node, gloo over 127.0.0.1): world size 2, the node ranks in the launch lines,
    the main process alone writes metrics, launches and checkpoints; one machine then resumes."""
    from conftest import tiny_args
    from stage_runs import failure, free_port, launches, read_records, run_stage, stage_env

    args = tiny_args(tiny_shards, tmp_path, "pretrain.max_steps=4", "pretrain.checkpoint_every=2",
                     "pretrain.log_every=2", "pretrain.checkpoint_async=false")
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "jobs.launch", "--main-ip", "127.0.0.1", "-m", "hybridgan.pretrain", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**stage_env(), "SLURM_NNODES": "2", "SLURM_NODEID": str(rank), "SLURM_PROCID": str(rank),
             "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": "4242", "MAIN_PORT": str(port), "GPUS_PER_NODE": "0"})
        for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    for rank, output in enumerate(outputs):
        assert f"[launch] node {rank}/2: accelerate launch --quiet --multi_gpu --num_processes 2 --num_machines 2 " \
               f"--machine_rank {rank} --main_process_ip 127.0.0.1 --main_process_port {port} " in output

    stage = tmp_path / "t" / "pretrain"
    [launch] = launches(stage)
    assert (launch["world_size"], launch["batch_size_per_rank"]) == (2, 4)
    assert launch["distributed_type"].endswith("MULTI_CPU") and launch["device"].startswith("cpu")
    assert [r["step"] for r in read_records(stage, "train")] == [2, 4]
    checkpoints = sorted(path.name for path in (stage / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step-00000002", "step-00000004"], checkpoints

    resumed = run_stage("hybridgan.pretrain", [*args, "pretrain.max_steps=6"])
    assert resumed.returncode == 0, failure(resumed)
    assert [(l["world_size"], l["start_step"]) for l in launches(stage)] == [(2, 0), (1, 4)]
    assert launches(stage)[1]["resumed_from"]["world_size"] == 2
    assert [r["step"] for r in read_records(stage, "train")] == [2, 4, 6]
