"""Throughput benchmarks, one subcommand each.

    python -m hybridgan.bench loader --shards shards/NAME [--workers 1,2] [--batches N] [--json PATH]
    python -m hybridgan.bench pretrain|train|all [--config FILE] [--steps N] [--warmup N]
        [--batch-size B] [--data synthetic|shards] [--rate-size N] [--json PATH] [key=value ...]
    python -m hybridgan.bench matrix [--cpu] [--no-compile] [--budget-s S] [--json PATH] ...   (benchmarks/gpu.sh)

`loader`: train-split images/s of `make_loader` at `data.image_size` for each worker count (the
first batch, which pays for worker start-up, is timed apart), then images/s of `hybridgan.pack`
on `synthetic:N` into a temporary folder (synthetic drawing, JPEG encoding and tar writing).

`pretrain` / `train`: images/s of the real `BlurPretraining.step` / `GanTraining.step` (D kind from
`discriminator.kind`, D from scratch) at the stage's precision, channels_last and compile settings,
in a throwaway run folder. The step time is split into data wait, G forward (train), D phase and G
phase; with the model FLOPs per image come achieved TFLOP/s and MFU (known GPUs only), and the
paper's speed for comparison. `--data synthetic` (default) feeds one random uint8 batch made once on
the device (as the loader's batches, normalised by the step): the step's compute alone; `--data
shards` reads `data.shards` with the real loader. `all`: the loader at `data.workers`, then
pretrain, then train, into one JSON. The JSON records the glibc `MALLOC_*` settings of the
environment (`malloc_env`) and whether the process keeps freed memory (`keeps_freed_memory`: the
CPU training session sets it, `hybridgan.host_memory`). Each stage also measures the machine in the same
process, right before and after its timed steps (`machine_rates`: matmul and 3x3 convolution
GFLOP/s, fp32 and bf16), and gives its GFLOP/s as a fraction of the best matmul rate.

`matrix`: the train step for fp32/bf16 x eager/compiled x hybrid/Pathak D on the real loader, into
benchmarks/results/<device>.json; it refuses to run without a GPU unless `--cpu`.
benchmarks/README.md explains each figure.

One module per subcommand (`loader`, `stages`, `matrix`), the figures of a timed stage in `figures`,
what they share in `measure`.
"""

from __future__ import annotations

from hybridgan.bench import loader, matrix, stages
from hybridgan.bench.figures import stage_table, step_figures, step_flops
from hybridgan.bench.loader import time_loader, time_pack
from hybridgan.bench.matrix import MATRIX, device_slug, run_matrix
from hybridgan.bench.measure import (DEFAULT_RATE_SIZE, PAPER_IMAGES_PER_S, PEAK_BF16_FLOPS, PhaseTimer, device_name,
                                     machine_rates, peak_flops, vs_machine)
from hybridgan.bench.stages import STAGES, bench_config, bench_stage, run_stages
from hybridgan.config import cli_parser, config_from_args

__all__ = ["DEFAULT_RATE_SIZE", "MATRIX", "PAPER_IMAGES_PER_S", "PEAK_BF16_FLOPS", "STAGES", "PhaseTimer",
           "bench_config", "bench_stage", "device_name", "device_slug", "machine_rates", "main", "peak_flops",
           "run_matrix", "run_stages", "stage_table", "step_figures", "step_flops", "time_loader", "time_pack",
           "vs_machine"]


def main(argv: list[str] | None = None) -> int:
    """Run the subcommand of `argv` (see the module docstring); its exit code."""
    parser = cli_parser("hybridgan.bench", __doc__.splitlines()[0], [
        "python -m hybridgan.bench train --config configs/paper.yaml --steps 2 --warmup 1 train.cpu=true",
        "python -m hybridgan.bench loader --shards shards/synthetic --workers 1,2",
        "python -m hybridgan.bench matrix --json benchmarks/results/gpu.json"])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for subcommand in (loader, stages, matrix):
        subcommand.add_parser(subparsers)
    args = parser.parse_args(argv)
    if args.print_config:
        config_from_args(args)
    return args.func(args)
