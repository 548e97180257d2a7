"""The one place that renders the `accelerate launch` line of a (multi-node) training job.

The sbatch templates run it once per node through `srun`:

    srun --ntasks-per-node=1 python -m jobs.launch -m hybridgan.train --config FILE ...

With no flags it reads the Slurm variables of the task (SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST,
SLURM_JOB_ID) and the template's (GPUS_PER_NODE, ACCELERATE_CONFIG, MAIN_PORT), prints the exact
command with a `[launch]` prefix, then replaces itself with it (`--dry-run` only prints).
`GPUS_PER_NODE=0` is the CPU mode: one process per node.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

DEFAULT_PORT = 29500


def task_cpus(gpus_per_node: int, loader_workers: int) -> int:
    """CPUs one node's task needs: every process (one per GPU, one in CPU mode) runs its main loop
    plus `loader_workers` DataLoader workers, each busy decoding JPEGs: G x (W + 1).

    The rule of the sbatch templates (`hg_task_cpus` in slurm/common.sh) and of `jobs.submit`.
    """
    if gpus_per_node < 0 or loader_workers < 0:
        raise ValueError(f"gpus_per_node={gpus_per_node} and loader_workers={loader_workers} must be >= 0")
    return max(gpus_per_node, 1) * (loader_workers + 1)


def accelerate_command(
    nnodes: int,
    node_rank: int | str,
    main_ip: str,
    port: int,
    gpus_per_node: int,
    module: str,
    args: list[str],
    accelerate_config: str | None = None,
) -> list[str]:
    """The argv of `accelerate launch` for one node of an `nnodes` x `gpus_per_node` job.

    `gpus_per_node=0` runs one CPU process per node. Without `accelerate_config` the distributed
    type is decided here (`--multi_gpu` when more than one process in all, which Accelerate turns into
    MULTI_CPU when the script asks for the CPU); with it, the file decides (DeepSpeed, FSDP ...) and
    only the topology comes from the arguments. `node_rank` may be a string such as "$SLURM_NODEID"
    to render a template for display.
    """
    if nnodes < 1 or gpus_per_node < 0:
        raise ValueError(f"nnodes={nnodes} must be >= 1 and gpus_per_node={gpus_per_node} >= 0")
    num_processes = nnodes * max(gpus_per_node, 1)
    # --quiet: a failing stage has already said why in one line; no launcher traceback on top.
    cmd = ["accelerate", "launch", "--quiet"]
    if accelerate_config:
        cmd += ["--config_file", accelerate_config]
    elif num_processes > 1:
        cmd += ["--multi_gpu"]
    cmd += ["--num_processes", str(num_processes), "--num_machines", str(nnodes)]
    if nnodes > 1:
        cmd += ["--machine_rank", str(node_rank), "--main_process_ip", main_ip]
    if num_processes > 1:
        cmd += ["--main_process_port", str(port)]
    if not accelerate_config:
        # Explicit values instead of Accelerate's "defaults were used" warning; the launcher's "no"
        # leaves the stage's own key (train.mixed_precision) alone (hybridgan.devices.launched_mixed_precision).
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    return cmd + ["-m", module, *args]


EXIT_USAGE = 2
"""Exit code of a launch that cannot be rendered here (as argparse's for a bad argument)."""


class LaunchError(RuntimeError):
    """The launch line cannot be rendered on this machine; one line names why and what to do."""


def first_host(nodelist: str) -> str:
    """The first host name of a Slurm node list ("gpu[01-04]" -> "gpu01"), via scontrol.

    LaunchError when scontrol is missing (outside Slurm) or refuses the list.
    """
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
        ).stdout.split()
    except FileNotFoundError:
        raise LaunchError(f"SLURM_JOB_NODELIST={nodelist} needs scontrol to find the main node, and scontrol "
                          f"is not on PATH: run inside the Slurm job, or pass --main-ip HOST") from None
    except subprocess.CalledProcessError as err:
        reason = err.stderr.strip().splitlines()[-1] if err.stderr.strip() else f"exit code {err.returncode}"
        raise LaunchError(f"scontrol show hostnames {nodelist} failed ({reason}): pass --main-ip HOST") from None
    return out[0]


def job_port(job_id: str | None) -> int:
    """A port per job (29500 + job id mod 1000), so two jobs sharing a node do not collide."""
    return DEFAULT_PORT + int(job_id) % 1000 if job_id and job_id.isdigit() else DEFAULT_PORT


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"launch: {name}={value!r} is not an integer") from None


def _parser() -> argparse.ArgumentParser:
    env = os.environ
    p = argparse.ArgumentParser(
        prog="python -m jobs.launch",
        description="Render (and exec) the accelerate launch line of this Slurm task.",
    )
    p.add_argument("-m", "--module", required=True,
                   help="module to launch, e.g. hybridgan.train; what follows it is its arguments")
    p.add_argument("--nnodes", type=int, default=_env_int("SLURM_NNODES", 1))
    p.add_argument("--node-rank", default=env.get("SLURM_NODEID", "0"))
    p.add_argument("--main-ip", default=None, help="default: first host of SLURM_JOB_NODELIST")
    p.add_argument("--port", type=int, default=_env_int("MAIN_PORT", job_port(env.get("SLURM_JOB_ID"))))
    p.add_argument(
        "--gpus-per-node", type=int,
        default=_env_int("GPUS_PER_NODE", _env_int("SLURM_GPUS_ON_NODE", 0)),
    )
    p.add_argument("--accelerate-config", default=env.get("ACCELERATE_CONFIG") or None)
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    return p


def _split_module(argv: list[str]) -> tuple[list[str], list[str]]:
    """Own options up to and including `-m MODULE`, then the module's arguments (as `python -m`)."""
    for i, arg in enumerate(argv):
        if arg in ("-m", "--module"):
            return argv[: i + 2], argv[i + 2 :]
        if arg.startswith("--module="):
            return argv[: i + 1], argv[i + 1 :]
    return argv, []


def main(argv: list[str] | None = None) -> None:
    own, args = _split_module(sys.argv[1:] if argv is None else argv)
    a = _parser().parse_args(own)
    if a.accelerate_config and not Path(a.accelerate_config).is_file():
        raise SystemExit(f"launch: ACCELERATE_CONFIG={a.accelerate_config}: file not found")
    try:
        main_ip = a.main_ip or first_host(os.environ.get("SLURM_JOB_NODELIST", ""))
    except LaunchError as err:
        print(f"launch: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    try:
        cmd = accelerate_command(
            a.nnodes, a.node_rank, main_ip, a.port, a.gpus_per_node, a.module, args, a.accelerate_config
        )
    except ValueError as err:
        raise SystemExit(f"launch: {err}") from None
    print(f"[launch] node {a.node_rank}/{a.nnodes}: {shlex.join(cmd)}", flush=True)
    if not a.dry_run:
        _ignore_stop_signals()
        # The same command through this interpreter: no need for the venv's bin/ on PATH.
        os.execv(sys.executable, [sys.executable, "-m", "accelerate.commands.launch", *cmd[2:]])


def _ignore_stop_signals() -> None:
    """Let the launcher outlive SIGTERM/SIGUSR1 (kept across exec) while the stage checkpoints.

    Slurm signals every process of a step; Accelerate's single-process launcher would die at once
    and the step would end, killing the stage mid-checkpoint. The stage installs its own handlers,
    and torchrun's agent (multi-process) installs its own SIGTERM handler that forwards to workers.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


if __name__ == "__main__":
    main()
