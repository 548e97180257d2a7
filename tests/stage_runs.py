"""Helpers for tests that run training stages as real processes (kill, resume, multi-process)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def free_port() -> int:
    """A TCP port no one listens on now, so that concurrent multi-process test runs do not collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_2_ranks() -> list[str]:
    """`accelerate launch` of real 2-rank DDP over gloo on the CPU, on a free port."""
    return [*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]


def stage_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_stage(module: str, args: list[str], launcher: list[str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m module args` (or under `launcher`) to completion; output captured."""
    command = [*(launcher or [sys.executable]), "-m", module, *args]
    return subprocess.run(command, cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=timeout)


def failure(proc: subprocess.CompletedProcess, chars: int = 2500) -> str:
    """A failed run's stderr for an assertion message. Under `accelerate launch` the last thing printed
    is the launcher's own traceback, which names only each rank's exit code: the message is the end of
    what the ranks printed before it (the real error), then the launcher's lines naming the exit codes."""
    text = proc.stderr or ""
    summary = text.find("ChildFailedError")
    if summary < 0:
        return text[-chars:]
    traceback = text.rfind("Traceback (most recent call last):", 0, summary)
    cut = traceback if traceback >= 0 else summary
    exit_codes = [line.strip() for line in text[summary:].splitlines() if "exitcode" in line]
    return "\n".join([text[:cut][-chars:], "[launcher] " + "; ".join(exit_codes)])


def start_stage(module: str, args: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    """Start a stage in a process group of its own, so that a signal reaches every rank."""
    return subprocess.Popen([*(launcher or [sys.executable]), "-m", module, *args], cwd=REPO, env=stage_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def latest_step(stage_dir: Path) -> int:
    pointer = stage_dir / "checkpoints" / "latest"
    return int(pointer.read_text().split("-")[1]) if pointer.is_file() else 0


def kill_after_checkpoint(module: str, args: list[str], stage_dir: Path, min_step: int,
                          sig: int = signal.SIGKILL, launcher: list[str] | None = None) -> subprocess.Popen:
    """Start a stage, send `sig` to its whole process group once a checkpoint of at least
    `min_step` exists; returns the process."""
    proc = start_stage(module, args, launcher)
    try:
        wait_for(lambda: latest_step(stage_dir) >= min_step or proc.poll() is not None, 300,
                 f"a checkpoint in {stage_dir}")
        assert proc.poll() is None, f"stage ended before it could be killed:\n{proc.stdout.read()}"
        os.killpg(proc.pid, sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc


def read_records(stage_dir: Path, split: str) -> list[dict]:
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def assert_same_weights(path_a: Path, path_b: Path) -> None:
    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def launches(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "launches.jsonl").read_text().splitlines()]
