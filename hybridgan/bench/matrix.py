"""`matrix`: the train step for precision x compile x D on the real loader (benchmarks/gpu.sh)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hybridgan.bench.measure import count_arg, device_name
from hybridgan.bench.stages import bench_config, bench_stage
from hybridgan.config import add_config_arguments


MATRIX = [("bf16", True, "hybrid"), ("bf16", False, "hybrid"), ("bf16", True, "pathak"), ("bf16", False, "pathak"),
          ("no", False, "hybrid"), ("no", False, "pathak"), ("no", True, "hybrid"), ("no", True, "pathak")]
"""The (precision, compile, D) cells of `matrix`, most wanted first: bf16 compiled hybrid is the GPU
target, and the fp32 compiled cells (the slowest to compile, the least used) come last."""


def device_slug(name: str) -> str:
    """A file name for a device name: "NVIDIA H200" -> "nvidia-h200"."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def run_matrix(args: argparse.Namespace) -> int:
    """`matrix`: the train step for precision x compile x D, real loader, one JSON written after each
    cell (so that a cut run keeps what it measured); cells left once `--budget-s` is spent are
    recorded as skipped. Without CUDA it refuses unless `--cpu` (a dry run of the same logic)."""
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA GPU visible (torch.cuda.is_available() is False); "
              "`matrix --cpu` runs the same cells on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    name = device_name(device)
    out = Path(args.json or f"benchmarks/results/{device_slug(name)}.json")
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "budget_s": args.budget_s,
                              "batch_size": args.batch_size, "cells": []}
    start = time.perf_counter()
    for precision, compiled, kind in MATRIX:
        cell: dict[str, Any] = {"precision": precision, "compile": compiled, "discriminator": kind}
        if time.perf_counter() - start > args.budget_s:
            cell["skipped"] = f"time budget of {args.budget_s} s spent"
        elif compiled and args.no_compile:
            cell["skipped"] = "--no-compile"
        else:
            overrides = [f"train.mixed_precision={precision}", f"train.compile={str(compiled).lower()}",
                         f"discriminator.kind={kind}", f"train.cpu={str(args.cpu).lower()}", "train.channels_last=auto"]
            cell.update(_matrix_cell(args, overrides))
        result["cells"].append(cell)
        result["seconds"] = round(time.perf_counter() - start, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(_matrix_line(cell), flush=True)
    print(f"wrote {out}")
    return 0


def _matrix_cell(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """One cell's figures (`bench_stage` plus the data-wait share), or the error that stopped it."""
    torch._dynamo.reset()  # each cell compiles its own models from scratch
    with tempfile.TemporaryDirectory(prefix="hybridgan-bench-") as root:
        cell_args = argparse.Namespace(config=args.config, overrides=[*args.overrides, *overrides],
                                       batch_size=args.batch_size)
        cfg = bench_config(cell_args, root)
        try:
            figures = bench_stage(cfg, "train", args.steps, args.warmup, "shards", args.rate_size)
        except Exception as err:  # a cell that fails (e.g. a compiler error) must not lose the others
            return {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"}
    figures["data_wait_share"] = round(figures["data_wait_ms"] / figures["step_ms"], 4)
    return figures


def _matrix_line(cell: dict[str, Any]) -> str:
    head = f"{cell['discriminator']:>6} {cell['precision']:>4} {'compiled' if cell['compile'] else 'eager':>8}: "
    if "images_per_s" not in cell:
        return head + cell.get("error", cell.get("skipped", ""))
    mfu = "-" if cell["mfu"] is None else f"{100 * cell['mfu']:.1f} %"
    memory = cell["peak_gpu_mib"] if cell["peak_gpu_mib"] is not None else cell["peak_host_mib"]
    return (head + f"{cell['images_per_s']} img/s, MFU {mfu}, {cell['vs_best_matmul']} x best matmul, "
            f"peak {memory} MiB, data wait {100 * cell['data_wait_share']:.1f} %")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("matrix", help="train step: fp32/bf16 x eager/compiled x hybrid/pathak (GPU)")
    parser.add_argument("--steps", type=count_arg(1), default=20, help="timed steps per cell")
    parser.add_argument("--warmup", type=count_arg(0), default=5, help="untimed steps first (compilation)")
    parser.add_argument("--batch-size", type=count_arg(0), default=0, help="default: train.batch_size")
    parser.add_argument("--rate-size", type=count_arg(0), default=0, help="matmul side of the machine rates")
    parser.add_argument("--budget-s", type=count_arg(1), default=420, help="start no cell after this many seconds")
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU (use tiny sizes)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled cells (CPU dry run)")
    parser.add_argument("--json", default=None, help="default benchmarks/results/<device>.json")
    add_config_arguments(parser)
    parser.set_defaults(func=run_matrix)
