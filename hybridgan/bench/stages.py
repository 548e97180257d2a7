"""`pretrain`, `train`, `all`: images/s of the real training steps, their phases and the machine's rates."""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from itertools import count, repeat
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from hybridgan.bench.figures import stage_table, step_figures, step_flops
from hybridgan.bench.loader import time_loader
from hybridgan.bench.measure import DEFAULT_RATE_SIZE, PhaseTimer, count_arg, machine_rates, table, vs_machine
from hybridgan.config import Config, ConfigError, add_config_arguments, load_config
from hybridgan.session import TrainingSession

STAGES = ("pretrain", "train")


def synthetic_batches(cfg: Config, batch_size: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """One random batch of the loader's keys, shapes and dtypes (uint8 images, float32 blur target), made
    once on `device`, yielded forever: the step normalises it on the device as it does a loader batch."""
    size, hole = cfg.data.image_size, cfg.mask.hole_size
    rng = torch.Generator().manual_seed(cfg.run.seed)
    image = torch.randint(0, 256, (batch_size, 3, size, size), generator=rng, dtype=torch.uint8)
    blur_target = torch.ones(batch_size, 1, size, size)
    lo = (size - hole) // 2
    blur_target[..., lo:lo + hole, lo:lo + hole] = 0
    blurred = (image * blur_target + (image // 2) * (1 - blur_target)).to(torch.uint8)
    batch = {"image": image, "blurred": blurred, "blur_target": blur_target}
    return repeat({name: value.to(device) for name, value in batch.items()})


def shard_batches(cfg: Config, stage: str, batch_size: int, session: TrainingSession) -> Iterator[dict[str, Any]]:
    """This rank's train batches from `data.shards`, epoch after epoch, as the stage's loop reads them."""
    from hybridgan.data.loader import LoaderError, SplitLoader

    loader = SplitLoader(cfg, "train", batch_size=batch_size, rank=session.rank, world_size=session.world_size,
                         with_blur=stage == "pretrain")
    for epoch in count():
        empty = True
        for batch in loader(epoch):
            empty = False
            yield batch
        if empty:
            raise LoaderError(f"{cfg.data.shards}: the train split holds no full batch of {batch_size}")


def _stage_job(cfg: Config, stage: str, timer: PhaseTimer) -> tuple[TrainingSession, Any, Callable[[dict], dict]]:
    """The stage's session, its real job object, and its step with its phases timed.

    GanTraining.step runs G's forward once, then `self.discriminator_step` and `self.generator_step`:
    forward hooks on G time its forward ("g_forward"), and wrapping the two phase methods on the
    instance times the phases of the unchanged step. A pretraining step is all D phase.
    """
    from accelerate.state import AcceleratorState

    from hybridgan.pretrain import STAGE, BlurPretraining
    from hybridgan.train import GanTraining, stage_name

    AcceleratorState._reset_state()  # the stages of `all` may differ in mixed precision
    if stage == "pretrain":
        session = TrainingSession(cfg, STAGE, cfg.pretrain)
        job: Any = BlurPretraining(cfg, session)
        return session, job, timer.wrap("d_phase", job.step)
    session = TrainingSession(cfg, stage_name(cfg), cfg.train)
    job = GanTraining(cfg, session)
    timer.time_forward("g_forward", job.gen)
    job.discriminator_step = timer.wrap("d_phase", job.discriminator_step)
    job.generator_step = timer.wrap("g_phase", job.generator_step)
    return session, job, job.step


def bench_stage(cfg: Config, stage: str, steps: int, warmup: int, data: str = "synthetic",
                rate_size: int = 0) -> dict[str, Any]:
    """Time `steps` steps of `stage` ("pretrain" or "train") after `warmup` untimed ones; the figures,
    with the machine's matmul and convolution rates measured right before and after the timed steps
    (`rate_size`: the matmul side, 0 for the device's DEFAULT_RATE_SIZE).

    `cfg.run.root` should be a throwaway folder: the session writes its stage folder there.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    stage_cfg = getattr(cfg, stage)
    timer = PhaseTimer(torch.device("cuda" if torch.cuda.is_available() and not stage_cfg.cpu else "cpu"))
    session, job, step = _stage_job(cfg, stage, timer)
    timer.cuda = session.device.type == "cuda"
    flops = step_flops(stage, job, session, cfg)
    batches = (synthetic_batches(cfg, stage_cfg.batch_size, session.device) if data == "synthetic"
               else shard_batches(cfg, stage, stage_cfg.batch_size, session))
    next_batch = timer.wrap("data_wait", lambda: next(batches))
    for _ in range(warmup):
        step(next_batch())
    rate_size = rate_size or DEFAULT_RATE_SIZE.get(session.device.type, DEFAULT_RATE_SIZE["cpu"])
    before = machine_rates(session.device, rate_size)
    if timer.cuda:  # the peak of the steps, not of the rate measurement's matrices
        torch.cuda.reset_peak_memory_stats()
    timer.seconds.clear()
    timer.sync()
    start = time.perf_counter()
    for _ in range(steps):
        losses = step(next_batch())
    timer.sync()
    seconds = time.perf_counter() - start
    session.close()
    figures = step_figures(cfg, stage, session, timer, flops, steps, warmup, seconds, data, losses)
    vs_machine(figures, before, machine_rates(session.device, rate_size))
    return figures


def bench_config(args: argparse.Namespace, root: str) -> Config:
    """The config of `args` with a throwaway run folder, D from scratch and `--batch-size` applied."""
    extra = [f"run.root={root}", "run.name=bench", "discriminator.from_scratch=true"]
    if args.batch_size:
        extra += [f"pretrain.batch_size={args.batch_size}", f"train.batch_size={args.batch_size}"]
    try:
        return load_config(args.config, [*args.overrides, *extra])
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None


def run_stages(args: argparse.Namespace) -> int:
    """`pretrain`, `train` or `all`: bench, print the table, write the JSON."""
    stages = STAGES if args.command == "all" else (args.command,)
    with tempfile.TemporaryDirectory(prefix="hybridgan-bench-") as root:
        cfg = bench_config(args, root)
        try:
            result: dict[str, Any] = {}
            if args.command == "all":
                result["loader"] = time_loader(cfg, cfg.data.workers, args.steps, cfg.train.batch_size)
            for stage in stages:
                result[stage] = bench_stage(cfg, stage, args.steps, args.warmup, args.data, args.rate_size)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    if "loader" in result:
        print(table(f"train loader: {cfg.data.shards}", [result["loader"]],
                     ["workers", "images_per_s", "first_batch_s"]))
    print(stage_table([result[stage] for stage in stages]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        figures = result if args.command == "all" else result[args.command]
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


def add_parser(subparsers: Any) -> None:
    helps = {"pretrain": "blur pretraining step images/s", "train": "GAN training step images/s (D and G phases)",
             "all": "loader, pretrain and train into one JSON"}
    for command, text in helps.items():
        parser = subparsers.add_parser(command, help=text)
        parser.add_argument("--steps", type=count_arg(1), default=20, help="timed steps")
        parser.add_argument("--warmup", type=count_arg(0), default=3, help="untimed steps first")
        parser.add_argument("--batch-size", type=count_arg(0), default=0, help="default: the stage's batch_size")
        parser.add_argument("--data", choices=("synthetic", "shards"), default="synthetic",
                            help="one random batch on the device (compute alone) or the real loader")
        parser.add_argument("--rate-size", type=count_arg(0), default=0,
                            help="matmul side of the machine-rate measurement (default 2048 CPU, 8192 GPU)")
        parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
        add_config_arguments(parser)
        parser.set_defaults(func=run_stages)
