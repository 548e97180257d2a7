"""Submit one stage or the whole chain with submitit: Slurm jobs with `afterok` dependencies, or the
same chain run one stage after the other through submitit's LocalExecutor on this machine.

    python -m jobs.submit chain --config configs/paper.yaml --data /data/celeba-hq \\
        --partition gpu --nodes 4 --gpus-per-node 8 --time 24:00:00
    python -m jobs.submit train --config configs/paper.yaml discriminator.kind=pathak
    python -m jobs.submit chain --config configs/smoke-cpu.yaml --cluster local
    python -m jobs.submit train --config configs/paper.yaml --slurm-arg qos=high --slurm-arg constraint=a100

GPUs per node: `--gpus-per-node N`, else the training templates' `#SBATCH --gpus-per-node` (8); a
config whose stages say `cpu: true`, or `--cpu`, is CPU mode (no GPUs, one process per node). A GPU
config is never switched to the CPU silently: `--gpus-per-node 0` without `--cpu` is refused.
`--slurm-arg KEY=VALUE` (or `KEY` for a flag) adds `#SBATCH --KEY=VALUE` to every job, after (so
over) the options set here.

The chain is pack -> pretrain -> train-hybrid, pack -> train-pathak, pack -> train-none (no
discriminator, the baseline), the three trains -> evaluate (which
also writes runs/<name>/report.md). Each job asks for the CPUs its processes use (`stage_cpus`):
a training task runs one process per GPU, each with `data.workers` loader workers, so it asks for
GPUs per node x (data.workers + 1); evaluate data.workers + 1; pack pack.workers. `--cpus-per-task`
overrides this for every job, and `srun` gets the same number (since Slurm 22.05 it no longer
inherits it from the job). Every job is a thin wrapper around the stage's own command
(the same commands as `hybridgan.reproduce`, training stages started per node by `jobs.launch`),
so a requeued job re-runs that command and the stage resumes its run folder.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from hybridgan.config import Config, ConfigError, load_config, save_config
from hybridgan.reproduce import stage_commands, write_report
from jobs.launch import task_cpus

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"
"""The training template whose `#SBATCH --gpus-per-node` is the GPUs per node when not given."""
SLURM_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
"""An sbatch long option without its dashes (`qos`, `mem`, `gres`, `mail-type`)."""
STAGES = ("pack", "pretrain", "train", "train-hybrid", "train-pathak", "train-none", "evaluate")
TRAINING = ("pretrain", "train-hybrid", "train-pathak", "train-none")
PREEMPT_SIGNAL = "USR1"
"""The time-limit signal: the stages checkpoint on it, submitit's handler requeues on it."""
EXIT_REQUEUE = 75
"""The stages' exit code after a signal-triggered checkpoint (hybridgan.session.EXIT_REQUEUE)."""

_running: subprocess.Popen | None = None
"""The stage process of this job (a module global so that the wrapper itself stays picklable)."""


class SubmitError(RuntimeError):
    """A bad argument or cluster setting; the message is one line naming it."""


class StageStopped(RuntimeError):
    """The stage checkpointed and exited on a signal (Slurm requeue, scancel, preemption)."""


@dataclass
class StageJob(submitit.helpers.Checkpointable):
    """One stage as a submitit job: runs `command` in `cwd` with `env` added, fails on non-zero.

    On the time-limit signal submitit calls `checkpoint()`: the stage has received the same signal
    from Slurm and is writing its checkpoint, so wait for it, then hand back a fresh copy of this
    job, which submitit requeues; the re-run resumes from the run folder.
    """

    name: str
    command: list[str]
    cwd: str
    env: dict[str, str] = field(default_factory=dict)
    checkpoint_wait_s: float = 100.0

    def __call__(self) -> str:
        global _running
        print(f"[submit] {self.name}: {shlex.join(self.command)}", flush=True)
        _running = subprocess.Popen(self.command, cwd=self.cwd, env={**os.environ, **self.env})
        # poll, not wait(): the signal handler must be able to wait on the child itself.
        while _running.poll() is None:
            time.sleep(0.5)
        rc = _running.returncode
        if rc == EXIT_REQUEUE:
            raise StageStopped(f"stage {self.name} checkpointed and stopped on a signal; re-run to resume")
        if rc != 0:
            raise RuntimeError(f"stage {self.name} failed with exit code {rc}: {shlex.join(self.command)}")
        return self.name

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        if _running is not None and _running.poll() is None:
            try:
                _running.wait(timeout=self.checkpoint_wait_s)
            except subprocess.TimeoutExpired:
                print(f"[submit] {self.name}: stage still running after {self.checkpoint_wait_s:.0f} s", flush=True)
        return submitit.helpers.DelayedSubmission(StageJob(self.name, self.command, self.cwd, self.env,
                                                           self.checkpoint_wait_s))


def chain_dependencies(stages: list[str]) -> dict[str, list[str]]:
    """Which earlier stages each stage waits for, among those submitted together."""
    wanted = {
        "pretrain": ["pack"],
        "train-hybrid": ["pretrain"],
        "train-pathak": ["pack"],
        "train-none": ["pack"],
        "evaluate": ["train-hybrid", "train-pathak", "train-none"],
    }
    return {s: [d for d in wanted.get(s, []) if d in stages] for s in stages}


def resolve_config(config: str, overrides: list[str], data: str | None, cpu: bool) -> Config:
    """The chain's config: file + `--data` + overrides, then `pretrain.cpu=true train.cpu=true` when
    `cpu` (`--cpu`)."""
    extra = [f"data.source={data}"] if data else []
    forced = ["pretrain.cpu=true", "train.cpu=true"] if cpu else []
    try:
        return load_config(config, [*extra, *overrides, *forced])
    except ConfigError as err:
        raise SubmitError(f"config error: {err}") from None


def template_gpus(template: Path = TEMPLATE) -> int:
    """The `#SBATCH --gpus-per-node` of a template; SubmitError when it has none."""
    found = re.search(r"^#SBATCH --gpus-per-node=(\d+)$", template.read_text() if template.is_file() else "", re.M)
    if found is None:
        raise SubmitError(f"{template}: no '#SBATCH --gpus-per-node=N' line to take the GPUs per node from; "
                          f"pass --gpus-per-node N")
    return int(found.group(1))


def training_gpus(cfg: Config, config: str, asked: int | None) -> int:
    """GPUs per node of the training jobs: 0 when the config trains on the CPU (both stages' `cpu`),
    else `asked` (`--gpus-per-node`) or the template's. SubmitError on a contradiction: GPUs asked
    for a CPU config, or no GPUs for a GPU config."""
    if cfg.pretrain.cpu and cfg.train.cpu:
        if asked:
            raise SubmitError(f"--gpus-per-node {asked}: {config} trains on the CPU (pretrain.cpu=true, "
                              f"train.cpu=true); drop --gpus-per-node or override pretrain.cpu=false train.cpu=false")
        return 0
    gpus = template_gpus() if asked is None else asked
    if gpus == 0:
        raise SubmitError(f"--gpus-per-node 0: {config} trains on GPUs (pretrain.cpu={cfg.pretrain.cpu}, "
                          f"train.cpu={cfg.train.cpu}); pass --cpu to train on CPUs, or ask for GPUs")
    return gpus


def slurm_options(items: list[str]) -> dict[str, str | bool]:
    """`--slurm-arg` items (`KEY=VALUE`, or `KEY` for a flag) as submitit's
    `slurm_additional_parameters`; SubmitError naming a malformed one."""
    options: dict[str, str | bool] = {}
    for item in items:
        key, has_value, value = item.partition("=")
        if not SLURM_KEY.fullmatch(key) or (has_value and not value):
            raise SubmitError(f"--slurm-arg {item!r}: expected KEY=VALUE or KEY, an sbatch long option without "
                              f"its dashes (e.g. qos=high, mem=64G, exclusive)")
        options[key] = value if has_value else True
    return options


def check_partition(partition: str) -> None:
    """Fail early, in one line, on a partition this cluster does not have."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise SubmitError("sinfo not found: not on a Slurm cluster (use --cluster local)") from None
    except subprocess.CalledProcessError as err:
        raise SubmitError(f"sinfo failed: {err.stderr.strip().splitlines()[-1] if err.stderr.strip() else err}") from None
    known = sorted(set(out.split()))
    if partition not in known:
        raise SubmitError(f"--partition {partition}: no such Slurm partition (sinfo lists: {', '.join(known)})")


def stage_cpus(stage: str, cfg: Config, gpus_per_node: int, override: int | None = None) -> int:
    """CPUs per task of `stage`'s job: `override` when given, else what its processes use."""
    if override is not None:
        return override
    if stage in TRAINING:
        return task_cpus(gpus_per_node, cfg.data.workers)
    if stage == "evaluate":
        return task_cpus(min(gpus_per_node, 1), cfg.data.workers)
    if stage == "pack":
        return max(cfg.pack.workers, 1)
    return 1


def stage_table(cfg_path: Path, cfg: Config, gpus_per_node: int, cpus: int) -> dict[str, list[str]]:
    """Stage name -> command; training and evaluation start through jobs.launch (one per node)."""
    launcher = [sys.executable, "-m", "jobs.launch"]
    table = {name: cmd for name, cmd, _ in stage_commands(cfg_path, cfg, launcher)}
    table["pack"] = [*table["pack"], "--workers", str(cpus)]
    if gpus_per_node == 0:
        table["evaluate"] = [*table["evaluate"], "--cpu"]
    return table


def selected_stages(stage: str, cfg: Config) -> list[str]:
    if stage == "chain":
        return ["pack", "pretrain", "train-hybrid", "train-pathak", "train-none", "evaluate"]
    if stage == "train":
        return [f"train-{cfg.discriminator.kind}"]
    return [stage]


def executor_for(args: argparse.Namespace, cfg: Config, folder: Path, stage: str) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster)
    training = stage in TRAINING
    gpus = args.gpus_per_node if training or stage == "evaluate" else 0
    cpus = stage_cpus(stage, cfg, args.gpus_per_node, args.cpus_per_task)
    params: dict[str, Any] = {
        "name": f"hybridgan-{stage}",
        "nodes": args.nodes if training else 1,
        "tasks_per_node": 1,
        "cpus_per_task": cpus,
        "gpus_per_node": min(gpus, 1) if stage == "evaluate" else gpus,
        "timeout_min": args.timeout_min,
    }
    if args.cluster == "slurm":
        additional = {"kill-on-invalid-dep": "yes", "signal": f"{PREEMPT_SIGNAL}@{args.signal_delay_s}"}
        if training and gpus > 0:
            additional["exclusive"] = True
        additional.update(slurm_options(args.slurm_arg))
        params.update(
            slurm_partition=args.partition,
            slurm_account=args.account,
            slurm_time=args.time,
            slurm_additional_parameters=additional,
            slurm_srun_args=["--cpus-per-task", str(cpus)],
            slurm_setup=[f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}"],
        )
        params = {k: v for k, v in params.items() if v is not None}
    executor.update_parameters(**params)
    return executor


def stage_env(stage: str, env: dict[str, str]) -> dict[str, str]:
    """Evaluate runs on one GPU at most (its job asks for one), whatever the training stages use."""
    if stage != "evaluate":
        return env
    return {**env, "GPUS_PER_NODE": str(min(int(env["GPUS_PER_NODE"]), 1)), "ACCELERATE_CONFIG": ""}


def submit(args: argparse.Namespace) -> dict[str, str]:
    """Submit the selected stages; returns stage -> job id (printed as they go)."""
    if args.cluster == "slurm" and args.partition:
        check_partition(args.partition)
    if args.accelerate_config and not Path(args.accelerate_config).is_file():
        raise SubmitError(f"--accelerate-config {args.accelerate_config}: file not found")
    if args.slurm_arg and args.cluster != "slurm":
        raise SubmitError(f"--slurm-arg {args.slurm_arg[0]}: sbatch options need --cluster slurm")
    slurm_options(args.slurm_arg)  # a bad one is named before anything is written
    cfg = resolve_config(args.config, args.overrides, args.data, args.cpu)
    args = argparse.Namespace(**{**vars(args), "gpus_per_node": training_gpus(cfg, args.config, args.gpus_per_node)})
    run_dir = Path(cfg.run.root) / cfg.run.name
    cfg_path = run_dir / "submit.yaml"
    save_config(cfg, cfg_path)
    table = stage_table(cfg_path, cfg, args.gpus_per_node,
                        stage_cpus("pack", cfg, args.gpus_per_node, args.cpus_per_task))
    stages = selected_stages(args.stage, cfg)
    depends = chain_dependencies(stages)
    env = {"GPUS_PER_NODE": str(args.gpus_per_node), "ACCELERATE_CONFIG": args.accelerate_config or ""}
    cwd = os.getcwd()
    jobs: dict[str, submitit.Job] = {}
    ids: dict[str, str] = {}
    for stage in stages:
        executor = executor_for(args, cfg, run_dir / "submitit", stage)
        after = [ids[d] for d in depends[stage]]
        if args.cluster == "slurm" and after:
            executor.update_parameters(slurm_dependency="afterok:" + ":".join(after))
        elif args.cluster == "local":
            for name, job in jobs.items():  # one stage after the other on this machine
                _wait_local(name, job)
        jobs[stage] = executor.submit(StageJob(stage, table[stage], cwd, stage_env(stage, env)))
        ids[stage] = str(jobs[stage].job_id)
        how = f" (afterok:{':'.join(after)})" if after and args.cluster == "slurm" else ""
        print(f"[submit] {stage}: job {ids[stage]}{how}", flush=True)
    if args.cluster == "local":
        for name, job in jobs.items():
            _wait_local(name, job)
    if "evaluate" in stages:
        report_job = _report_after(args, run_dir, cfg, ids, jobs["evaluate"])
        if report_job is not None:
            ids["report"] = report_job
    print(f"[submit] run folder: {run_dir}")
    print(f"[submit] logs: {run_dir / 'submitit'}")
    print(f"[submit] watch: tensorboard --logdir {run_dir}")
    return ids


def _wait_local(stage: str, job: submitit.Job) -> None:
    """Block until a local job ends; a failure is one line naming the stage and its log."""
    try:
        job.result()
    except Exception as err:  # submitit re-raises the job's error with its whole traceback
        last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise SubmitError(f"stage {stage} (job {job.job_id}) failed: {last} (log: {job.paths.stderr})") from None


def _report_after(args: argparse.Namespace, run_dir: Path, cfg: Config, ids: dict[str, str],
                  evaluate: submitit.Job) -> str | None:
    """report.md once evaluation is done: now (local) or as a small dependent job (Slurm)."""
    if args.cluster == "local":
        print(f"[submit] report: {write_report(cfg, [(s, f'job {i}') for s, i in ids.items()])}")
        return None
    executor = executor_for(args, cfg, run_dir / "submitit", "report")
    executor.update_parameters(slurm_dependency=f"afterok:{evaluate.job_id}", slurm_time="00:10:00")
    job = executor.submit(report_job, cfg, ids)
    print(f"[submit] report: job {job.job_id} (afterok:{evaluate.job_id}) writes {run_dir / 'report.md'}")
    return str(job.job_id)


def report_job(cfg: Config, ids: dict[str, str]) -> str:
    """The Slurm report job: each stage's run time (from scontrol, while Slurm remembers the job)."""
    timings = []
    for stage, job_id in ids.items():
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
        found = re.search(r"\bRunTime=(\S+)", out)
        timings.append((stage, f"{found.group(1)} (job {job_id})" if found else f"job {job_id}"))
    return str(write_report(cfg, timings))


_DESCRIPTION = " ".join(__doc__.split("\n\n")[0].split())
"""The module docstring's first paragraph, whole (argparse's --help reflows it)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.submit", description=_DESCRIPTION)
    p.add_argument("stage", choices=[*STAGES, "chain"], help="one stage, or the whole chain")
    p.add_argument("--config", default="smoke-cpu",
                   help="a YAML config file or a packaged config's name (paper, smoke-cpu, folder-1k-cpu)")
    p.add_argument("--data", help="images to pack: a folder, a .zip or synthetic:N (default: data.source)")
    p.add_argument("--cluster", choices=["slurm", "local"], default="slurm")
    p.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--nodes", type=int, default=1, help="nodes per training job")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node of training jobs (default: the templates' #SBATCH --gpus-per-node, 8; "
                        "0 for a config whose stages say cpu: true)")
    p.add_argument("--cpu", action="store_true", help="train on CPUs: pretrain.cpu=true train.cpu=true, no GPUs")
    p.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an sbatch option for every job, repeatable: --slurm-arg qos=high --slurm-arg mem=64G "
                        "(KEY alone for a flag)")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per task (one task per node) of every job; default: per stage, training "
                        "GPUs per node x (data.workers + 1), evaluate data.workers + 1, pack pack.workers")
    p.add_argument("--accelerate-config", help="Accelerate config file for training (configs/accelerate/)")
    p.add_argument("--time", default="24:00:00", help="Slurm time limit per job")
    p.add_argument("--timeout-min", type=int, default=24 * 60, help="local executor time limit")
    p.add_argument("--signal-delay-s", type=int, default=120,
                   help="seconds before the time limit when training checkpoints and requeues")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.epochs=2")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_intermixed_args(argv)
    if args.cpu and args.gpus_per_node:
        raise SystemExit(f"submit: --cpu and --gpus-per-node {args.gpus_per_node}: choose one")
    negative_gpus = args.gpus_per_node is not None and args.gpus_per_node < 0
    if args.nodes < 1 or negative_gpus or (args.cpus_per_task is not None and args.cpus_per_task < 1):
        raise SystemExit("submit: --nodes and --cpus-per-task must be >= 1, --gpus-per-node >= 0")
    try:
        submit(args)
    except SubmitError as err:
        raise SystemExit(f"submit: {err}") from None
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"submit: {shlex.join(map(str, err.cmd))} failed: {(err.stderr or '').strip()}") from None


if __name__ == "__main__":
    main()
