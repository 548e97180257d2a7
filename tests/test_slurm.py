"""The sbatch templates and jobs.submit on a real one-node Slurm (tests/slurm_cluster.sh), CPU mode.

Every wait has a timeout. The cluster has no accounting daemon: job states come from `scontrol`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm_cluster.sh"
SLURM_DIR = Path(os.environ.get("HYBRIDGAN_SLURM_DIR", "/tmp/hybridgan-slurm"))
TINY = [  # smoke-cpu.yaml made tiny: 32x32, no loader workers, few steps
    "data.image_size=32", "mask.hole_size=16", "data.workers=0", "train.eval_every=0",
    "discriminator.min_pretrain_accuracy=0",  # a 4-step pretraining is at chance on purpose
]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """Environment for Slurm commands; starts the cluster if tests/run.sh did not (idempotent)."""
    proc = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        reason_file = SLURM_DIR / "unavailable"
        reason = reason_file.read_text().strip() if reason_file.is_file() else proc.stderr.strip()
        if proc.returncode == 3:
            pytest.skip(f"Slurm unavailable on this machine: {reason}")
        pytest.fail(f"tests/slurm_cluster.sh start failed: {reason}")
    match = re.search(r"SLURM_CONF=(\S+)", (SLURM_DIR / "env").read_text())
    assert match, "slurm_cluster.sh wrote no SLURM_CONF"
    venv_bin = Path(sys.executable).parent
    return {
        **os.environ,
        "SLURM_CONF": match.group(1),
        "PATH": f"{venv_bin}:{os.environ['PATH']}",
        "HYBRIDGAN_ACTIVATE": f"source {venv_bin / 'activate'}",
        "CONFIG": "configs/smoke-cpu.yaml",
    }


def run(cmd: list[str], env: dict[str, str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=check)


def sbatch(env: dict[str, str], log: Path, script: str, *args: str, options: tuple[str, ...] = ()) -> str:
    """Submit a template from the repository root; returns the job id."""
    out = run(["sbatch", "--parsable", "--output", str(log), *options, f"slurm/{script}", *args], env)
    return out.stdout.strip().split(";")[0]


def job_info(job_id: str, env: dict[str, str]) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, Dependency ...)."""
    out = run(["scontrol", "show", "job", "-o", job_id], env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_done(job_id: str, env: dict[str, str], timeout: float) -> dict[str, str]:
    def done() -> dict[str, str] | None:
        info = job_info(job_id, env)
        return info if info["JobState"] in DONE else None
    return wait_for(done, timeout, f"job {job_id} to end")


def train_steps(stage_dir: Path) -> list[int]:
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if r["split"] == "train"]


@pytest.fixture(scope="module")
def shards(slurm_env, tmp_path_factory) -> Path:
    """120 synthetic faces packed by slurm/pack.sbatch (one CPU job)."""
    base = tmp_path_factory.mktemp("slurm-pack")
    log = base / "pack.out"
    job = sbatch(slurm_env, log, "pack.sbatch", f"run.root={base}/runs", "data.source=synthetic:120",
                 f"data.shards={base}/shards", "pack.shard_size=20", options=("--cpus-per-task=2",))
    info = wait_done(job, slurm_env, 120)
    assert info["JobState"] == "COMPLETED", log.read_text()
    manifest = json.loads((base / "shards" / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 96, "val": 12, "test": 12}
    assert "--workers 2" in log.read_text()  # the job's CPUs became pack workers
    return base / "shards"


def test_sbatch_train_cpu_mode(slurm_env, shards, tmp_path) -> None:
    """train.sbatch on --gpus-per-node=0: one CPU process through srun + jobs.launch + accelerate."""
    log = tmp_path / "train.out"
    job = sbatch(slurm_env, log, "train.sbatch", f"run.root={tmp_path}/runs", "run.name=tiny",
                 f"data.shards={shards}", "discriminator.kind=pathak", "train.max_steps=8",
                 "train.checkpoint_every=4", "train.log_every=2", *TINY,
                 options=("--gpus-per-node=0", "--cpus-per-task=2"))
    info = wait_done(job, slurm_env, 240)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    # The CPUs asked for reach the job and its srun step (which no longer inherits them).
    shown = run(["scontrol", "show", "job", job], slurm_env).stdout
    assert "NumCPUs=2 " in shown and "CPUs/Task=2 " in shown, shown
    assert "[slurm] 2 CPUs per task; 1 processes x (data.workers=0 + 1) need 1" in text
    assert "[slurm] running: srun --ntasks-per-node=1 --cpus-per-task=2 " in text
    stage = tmp_path / "runs" / "tiny" / "train-pathak"
    assert (stage / "generator.safetensors").stat().st_size > 0
    assert train_steps(stage)[-1] == 8
    # The accelerate line, with the topology derived from SLURM_NNODES/SLURM_NODEID, printed per node.
    line = next(l for l in text.splitlines() if l.startswith("[launch]"))
    assert line.startswith("[launch] node 0/1: accelerate launch --quiet --num_processes 1 --num_machines 1 "
                           "--mixed_precision no --dynamo_backend no -m hybridgan.train --config configs/smoke-cpu.yaml")
    assert line.endswith(TINY[-1]) and "cpu=true" not in line  # the config says cpu: nothing added
    assert f"[slurm] job {job} (train) on " in text and "nodes=1 restarts=0" in text
    launches = [json.loads(l) for l in (stage / "launches.jsonl").read_text().splitlines()]
    assert [(l["world_size"], l["device"]) for l in launches] == [(1, "cpu")]
    # The same log, copied into the run folder.
    copy = tmp_path / "runs" / "tiny" / "slurm" / f"hybridgan-train-{job}.out"
    assert line in copy.read_text()


def test_requeue_resumes_from_checkpoint(slurm_env, shards, tmp_path) -> None:
    """Time-limit signal (USR1 to the batch shell) and `scontrol requeue` both come back and resume."""
    log = tmp_path / "requeue.out"
    every, total = 3, 16
    job = sbatch(slurm_env, log, "train.sbatch", f"run.root={tmp_path}/runs", "run.name=rq",
                 f"data.shards={shards}", "discriminator.from_scratch=true", "train.epochs=4",
                 f"train.max_steps={total}", f"train.checkpoint_every={every}", "train.log_every=1", *TINY,
                 options=("--gpus-per-node=0", "--cpus-per-task=1"))
    stage = tmp_path / "runs" / "rq" / "train-hybrid"

    # What `--signal=B:USR1@120` does before the time limit: the batch shell alone gets USR1.
    wait_for(lambda: len(train_steps(stage)) >= every + 2, 180, "steps past the first checkpoint")
    run(["scancel", "--batch", "--signal=USR1", job], slurm_env)
    wait_for(lambda: job_info(job, slurm_env)["Restarts"] == "1", 90, "requeue after USR1")
    wait_for(lambda: "resumed" in log.read_text() and train_steps(stage)[-1:] > [every * 2],
             180, "the first resume and more steps")

    run(["scontrol", "requeue", job], slurm_env)
    wait_for(lambda: job_info(job, slurm_env)["Restarts"] == "2", 90, "scontrol requeue")
    info = wait_done(job, slurm_env, 240)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert "USR1 (time limit near): checkpointing, then requeue" in text
    assert f"requeueing job {job}" in text
    # Each signal made the stage checkpoint the step it was at; each restart resumed exactly there.
    stopped = [int(s) for s in re.findall(r"signal 15: checkpointed .* at step (\d+)", text)]
    resumed = [int(s) for s in re.findall(r"resumed .* \(step (\d+)\)", text)]
    assert resumed == stopped and len(resumed) == 2 and 0 < resumed[0] < resumed[1] < total, text
    # metrics.jsonl: every step once, in order, up to the end.
    assert train_steps(stage) == list(range(1, total + 1))
    launches = [json.loads(l)["start_step"] for l in (stage / "launches.jsonl").read_text().splitlines()]
    assert launches == [0, *resumed]
    assert "restarts=2" in text


def test_submit_chain_with_dependencies(slurm_env, tmp_path) -> None:
    """jobs.submit chain: afterok dependencies read back from scontrol, then a report."""
    out = run([sys.executable, "-m", "jobs.submit", "chain", "--config", "configs/smoke-cpu.yaml",
               "--partition", "cpu", "--slurm-arg", "comment=hybridgan-chain", "--slurm-arg", "nice=7",
               f"run.root={tmp_path}/runs", "run.name=chain",
               "data.source=synthetic:120", f"data.shards={tmp_path}/shards", "pack.shard_size=20",
               "pretrain.max_steps=4", "train.max_steps=4", "pretrain.checkpoint_every=2",
               "train.checkpoint_every=2", *TINY], slurm_env, timeout=120).stdout
    ids = dict(re.findall(r"\[submit\] ([\w-]+): job (\d+)", out))
    assert list(ids) == ["pack", "pretrain", "train-hybrid", "train-pathak", "train-none", "evaluate", "report"]
    want = {
        "pretrain": [ids["pack"]], "train-hybrid": [ids["pretrain"]], "train-pathak": [ids["pack"]],
        "train-none": [ids["pack"]], "evaluate": [ids["train-hybrid"], ids["train-pathak"], ids["train-none"]],
        "report": [ids["evaluate"]],
    }
    # CPUs per job derived from the config: pack.workers=2, data.workers=0 -> 1 process x (0 + 1).
    for stage, job in ids.items():
        shown = run(["scontrol", "show", "job", job], slurm_env).stdout
        assert f"CPUs/Task={2 if stage == 'pack' else 1} " in shown, (stage, shown)
        info = job_info(job, slurm_env)  # the --slurm-arg options reached every job
        assert (info["Comment"], info["Nice"]) == ("hybridgan-chain", "7"), (stage, shown)
    for stage, parents in want.items():
        dependency = job_info(ids[stage], slurm_env)["Dependency"]
        assert re.findall(r"afterok:(\d+)", dependency) == parents, (stage, dependency)
    assert f"tensorboard --logdir {tmp_path}/runs/chain" in out
    for stage, job in ids.items():
        info = wait_done(job, slurm_env, 420)
        assert info["JobState"] == "COMPLETED", (stage, info)
    folder = tmp_path / "runs" / "chain"
    report = (folder / "report.md").read_text()
    assert "## Table 1" in report and "## Table 2" in report
    assert re.search(rf"\| train-hybrid \| 00:\d\d:\d\d \(job {ids['train-hybrid']}\) \|", report), report
    for stage in ("train-hybrid", "train-pathak"):
        assert train_steps(folder / stage)[-1] == 4
        assert yaml.safe_load((folder / stage / "config.yaml").read_text())["train"]["cpu"] is True


def test_bad_template_variables_fail_in_one_line(slurm_env, tmp_path) -> None:
    """A missing config, a bad override or a missing Accelerate config: exit 2, one line naming it."""
    cases = {
        "config": ({"CONFIG": "configs/nope.yaml"}, [], "train.sbatch: CONFIG=configs/nope.yaml: config file not found"),
        "override": ({}, ["train.batch_size=0"], "train.sbatch: config error: configs/smoke-cpu.yaml with overrides: train.batch_size=0 must be > 0"),
        "accelerate": ({"ACCELERATE_CONFIG": "configs/accelerate/nope.yaml"}, [],
                       "train.sbatch: ACCELERATE_CONFIG=configs/accelerate/nope.yaml: file not found"),
    }
    jobs = {}
    for name, (extra, args, _) in cases.items():
        jobs[name] = sbatch({**slurm_env, **extra}, tmp_path / f"{name}.out", "train.sbatch",
                            f"run.root={tmp_path}/runs", *args, options=("--gpus-per-node=0", "--cpus-per-task=1"))
    for name, (_, _, message) in cases.items():
        info = wait_done(jobs[name], slurm_env, 120)
        assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), name
        lines = (tmp_path / f"{name}.out").read_text().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), lines


def test_a_gpu_config_on_a_job_without_gpus_is_one_line_not_a_silent_cpu_run(slurm_env, tmp_path) -> None:
    log = tmp_path / "gpu-config.out"
    job = sbatch({**slurm_env, "CONFIG": "configs/paper.yaml"}, log, "train.sbatch", f"run.root={tmp_path}/runs",
                 options=("--gpus-per-node=0", "--cpus-per-task=1"))
    info = wait_done(job, slurm_env, 120)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0")
    assert log.read_text().splitlines()[-1] == (
        "train.sbatch: no GPUs on this job (--gpus-per-node=0) but configs/paper.yaml trains train on GPUs "
        "(train.cpu=false): ask for GPUs (--gpus-per-node N), or pass train.cpu=true to train on CPUs")
    assert "[launch]" not in log.read_text()


def test_unknown_partition_is_named(slurm_env) -> None:
    proc = run([sys.executable, "-m", "jobs.submit", "train", "--partition", "nope"], slurm_env, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "submit: --partition nope: no such Slurm partition (sinfo lists: cpu)"
    raw = run(["sbatch", "--partition", "nope", "--gpus-per-node=0", "slurm/train.sbatch"], slurm_env, check=False)
    assert raw.returncode != 0 and "invalid partition specified: nope" in raw.stderr


def test_submit_missing_config_is_one_line(slurm_env) -> None:
    proc = run([sys.executable, "-m", "jobs.submit", "chain", "--config", "configs/nope.yaml"], slurm_env,
               check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "submit: config error: configs/nope.yaml: config file not found"
