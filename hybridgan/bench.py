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
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import replace
from itertools import count, repeat
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from hybridgan.config import Config, ConfigError, add_config_arguments, cli_parser, config_from_args, load_config
from hybridgan.devices import native_bf16
from hybridgan.host_memory import freed_memory_kept
from hybridgan.models import model_summary
from hybridgan.session import TrainingSession

PAPER_IMAGES_PER_S = 20 * 28_000 / (45 * 60)
"""The paper's only speed figure (§3): 20 epochs of 28,000 images in about 45 min on one RTX 3090."""

PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
                   ("RTX 3090", 71e12))
"""Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, first match wins; MFU's denominator."""

STAGES = ("pretrain", "train")

DEFAULT_RATE_SIZE = {"cpu": 2048, "cuda": 8192}
"""Matmul side N (N x N @ N x N) of the machine-rate measurement per device type; the 3x3
convolution is batch 16 N/2048 x 256 channels x 32x32 (the CPU default is 16 x 256 x 32x32)."""


class PhaseTimer:
    """Wall seconds per named phase. On CUDA it synchronises at each phase's start and end, so that
    a phase's time is its own kernels' and not the queue left by the phase before."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` with every call's wall time added to `seconds[name]`."""
        def timed(*args: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            out = fn(*args)
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            return out
        return timed

    def time_forward(self, name: str, module: torch.nn.Module) -> None:
        """Add every forward of `module` to `seconds[name]` (forward hooks: the module stays the same
        object, so the job's other uses of it are untouched)."""
        started: list[float] = []

        def before(*_: Any) -> None:
            self.sync()
            started.append(time.perf_counter())

        def after(*_: Any) -> None:
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started.pop()

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo with the number of cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model} ({os.cpu_count()} cores)"


def peak_flops(name: str) -> float | None:
    """The device's dense bf16 peak from PEAK_BF16_FLOPS, None when unknown (every CPU)."""
    return next((peak for fragment, peak in PEAK_BF16_FLOPS if fragment in name), None)


def _best_seconds(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    """The fastest of `repeats` timed calls of `fn`, after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def machine_rates(device: torch.device, size: int, repeats: int = 3) -> dict[str, Any]:
    """What this device does at its best, now, with the threads in use: GFLOP/s of a `size`-square
    matmul in fp32 and bf16, and of a 3x3 convolution (forward, no grad) in fp32 and bf16 (autocast),
    NCHW and channels_last. bf16 is timed only where the device computes it natively
    (`hybridgan.devices.native_bf16`; its rates are None elsewhere): emulated bf16 runs a CPU with
    AVX2 only at 0.3 GFLOP/s against 145 in fp32, so timing it took minutes for a precision `auto`
    never picks there. `best_matmul_gflops` is the fastest matmul timed; `precisions` those timed."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    precisions = [("fp32", torch.float32)]
    if native_bf16(device.type != "cuda"):
        precisions.append(("bf16", torch.bfloat16))
    rates: dict[str, Any] = {"threads": torch.get_num_threads(), "matmul_size": size,
                             "precisions": [name for name, _ in precisions]}
    for name in ("fp32", "bf16"):
        rates[f"matmul_{name}_gflops"] = None
        for layout in ("nchw", "channels_last"):
            rates[f"conv3x3_{name}_{layout}_gflops"] = None
    for name, dtype in precisions:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        rates[f"matmul_{name}_gflops"] = round(2 * size**3 / _best_seconds(lambda: a @ b, repeats, sync) / 1e9, 1)
    batch, channels, side = max(1, 16 * size // 2048), 256, 32
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device)
    image = torch.randn(batch, channels, side, side, device=device)
    conv_flops = 2 * batch * channels * channels * 9 * side * side
    rates["conv3x3_shape"] = [batch, channels, side, side]
    for layout, memory_format in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        conv, image = conv.to(memory_format=memory_format), image.contiguous(memory_format=memory_format)
        for name, dtype in precisions:
            def forward() -> Any:
                with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    return conv(image)
            seconds = _best_seconds(forward, repeats, sync)
            rates[f"conv3x3_{name}_{layout}_gflops"] = round(conv_flops / seconds / 1e9, 1)
    best = max(rates["precisions"], key=lambda name: rates[f"matmul_{name}_gflops"])
    rates["best_matmul_precision"], rates["best_matmul_gflops"] = best, rates[f"matmul_{best}_gflops"]
    return rates


def vs_machine(figures: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> None:
    """Add to a stage's `figures` the machine's rates measured right before and after it, and its
    GFLOP/s as a fraction of the best matmul rate: the higher of the two measurements, so that a
    load that came or went during the run makes the fraction smaller, never larger."""
    best = max(before["best_matmul_gflops"], after["best_matmul_gflops"])
    figures["machine"] = {"before": before, "after": after, "best_matmul_gflops": best}
    figures["achieved_gflops"] = round(figures["achieved_tflops"] * 1000, 1)
    figures["vs_best_matmul"] = round(figures["achieved_tflops"] * 1000 / best, 3)


def step_flops(stage: str, job: Any, session: TrainingSession, cfg: Config) -> dict[str, Any]:
    """Approximate FLOPs of one training step per batch image, from forward counts (backward ~ 2x forward).

    pretrain: D forward+backward on each face, as it is or blurred (a coin flip per face): 3 D.
    train (`GanTraining.step`): G forward once (1 G) and, in the G phase, its backward (2 G); D phase:
    D fwd+bwd on the real and on the detached fake batch (6 D); G phase: D fwd on the fake and the
    backward through D to its input, its weights frozen (counted as ~1 D, as before: 2 D): 3 G + 8 D.
    D's forward is counted on the whole frame, so a D that crops the hole (Pathak's) counts at the hole.
    """
    acc, size, device = session.accelerator, cfg.data.image_size, session.device
    image = torch.zeros(1, 3, size, size, device=device)
    disc = acc.unwrap_model(job.disc, keep_torch_compile=False)
    d_fwd = model_summary(disc, image)["flops_per_image"]
    params = {"discriminator": sum(p.numel() for p in disc.parameters())}
    if stage == "pretrain":
        return {"discriminator_forward": d_fwd, "step_per_image": 3 * d_fwd, "formula": "3 D", "params": params}
    gen = acc.unwrap_model(job.gen, keep_torch_compile=False)
    g_fwd = model_summary(gen, image, torch.zeros(1, 1, size, size, device=device))["flops_per_image"]
    params["generator"] = sum(p.numel() for p in gen.parameters())
    return {"generator_forward": g_fwd, "discriminator_forward": d_fwd, "step_per_image": 3 * g_fwd + 8 * d_fwd,
            "formula": "3 G + 8 D", "params": params}

def _worker_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers {text!r}: expected e.g. 1,2") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"--workers {text!r}: expected non-negative integers")
    return values


def time_loader(cfg: Config, workers: int, batches: int, batch_size: int, resident: bool = False) -> dict[str, Any]:
    """Read `batches` train batches (over as many epochs as needed); timings and images/s. `resident`:
    the split decoded once (by `workers` processes, in the first batch's time) into the memory of the
    GPU if there is one, else the host, and batches made there (data.resident)."""
    from hybridgan.data.loader import SplitLoader
    from hybridgan.data.resident import ResidentLoader

    start = time.perf_counter()
    first = None
    seen = images = 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = (ResidentLoader(cfg, "train", batch_size=batch_size, workers=workers, device=device) if resident
              else SplitLoader(cfg, "train", batch_size=batch_size, workers=workers))
    for epoch in count():
        for batch in loader(epoch):
            if batch["image"].is_cuda:
                torch.cuda.synchronize()
            if first is None:
                first = time.perf_counter()
            else:
                images += len(batch["key"])
            seen += 1
            if seen == batches + 1:
                steady = time.perf_counter() - first
                return {"workers": workers, **({"device": str(device)} if resident else {}),
                        "images": images, "seconds": round(steady, 3),
                        "images_per_s": round(images / steady, 1),
                        "first_batch_s": round(first - start, 3)}
    raise AssertionError("unreachable")


def time_pack(cfg: Config, workers: int, images: int) -> dict[str, Any]:
    """Pack synthetic:`images` into a temporary folder with `workers` processes; images/s."""
    from hybridgan.pack import pack

    pack_cfg = replace(cfg.pack, shard_size=max(1, images // max(4, 2 * workers)))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        pack(f"synthetic:{images}", Path(tmp) / "bench", pack_cfg, workers=workers)
        seconds = time.perf_counter() - start
    return {"workers": workers, "images": images, "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 1)}


def _table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = [title, "  ".join(f"{c:>14}" for c in columns)]
    lines += ["  ".join(f"{row[c]:>14}" for c in columns) for row in rows]
    return "\n".join(lines)


def run_loader(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.shards:
        cfg.data.shards = args.shards
    batch_size = args.batch_size or cfg.train.batch_size
    loader_rows = [time_loader(cfg, w, args.batches, batch_size) for w in args.workers]
    for row in loader_rows:
        row["images_per_s_per_worker"] = round(row["images_per_s"] / max(1, row["workers"]), 1)
    print(_table(f"train loader: {cfg.data.shards}, {cfg.data.image_size}x{cfg.data.image_size}, "
                 f"batch {batch_size}, {args.batches} batches, {os.cpu_count()} CPUs",
                 loader_rows, ["workers", "images_per_s", "images_per_s_per_worker", "first_batch_s"]))
    resident_rows = ([time_loader(cfg, max(args.workers), args.batches, batch_size, resident=True)]
                     if args.resident else [])
    if resident_rows:
        print(_table(f"resident train split (data.resident): batches made on {resident_rows[0]['device']}; "
                     f"first_batch_s includes decoding the split with `workers` processes",
                     resident_rows, ["workers", "device", "images_per_s", "first_batch_s"]))
    pack_rows = [time_pack(cfg, w, args.pack_images) for w in args.workers] if args.pack_images else []
    if pack_rows:
        print(_table(f"pack: synthetic:{args.pack_images} at {cfg.pack.source_size}x{cfg.pack.source_size}",
                     pack_rows, ["workers", "images_per_s", "seconds"]))
    if args.json:
        result = {"image_size": cfg.data.image_size, "batch_size": batch_size, "cpus": os.cpu_count(),
                  "shards": cfg.data.shards, "loader": loader_rows, "resident": resident_rows, "pack": pack_rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _add_loader(subparsers: Any) -> None:
    parser = subparsers.add_parser("loader", help="train loader and pack images/s")
    parser.add_argument("--shards", default=None, help="packed dataset (default data.shards)")
    parser.add_argument("--workers", type=_worker_list, default=[1, 2], help="worker counts, e.g. 1,2")
    parser.add_argument("--batches", type=int, default=50, help="timed batches per worker count")
    parser.add_argument("--batch-size", type=int, default=0, help="default train.batch_size")
    parser.add_argument("--pack-images", type=int, default=200, help="synthetic images to pack (0: skip)")
    parser.add_argument("--resident", action="store_true",
                        help="also time data.resident batches (the split decoded once into device memory)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    add_config_arguments(parser)
    parser.set_defaults(func=run_loader)


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
    figures = _figures(cfg, stage, session, timer, flops, steps, warmup, seconds, data, losses)
    vs_machine(figures, before, machine_rates(session.device, rate_size))
    return figures


def _figures(cfg: Config, stage: str, session: TrainingSession, timer: PhaseTimer, flops: dict[str, Any],
             steps: int, warmup: int, seconds: float, data: str, losses: dict[str, torch.Tensor]) -> dict[str, Any]:
    stage_cfg = getattr(cfg, stage)
    phases = ("data_wait", "g_forward", "d_phase", "g_phase")
    per_step_ms = {name: 1000 * timer.seconds.get(name, 0.0) / steps for name in phases}
    step_ms = 1000 * seconds / steps
    images_per_s = steps * stage_cfg.batch_size / seconds
    achieved = flops["step_per_image"] * images_per_s
    name = device_name(session.device)
    peak = peak_flops(name) if session.device.type == "cuda" else None
    cuda = session.device.type == "cuda"
    return {
        "stage": stage, "discriminator": "hybrid" if stage == "pretrain" else cfg.discriminator.kind,
        "device": name, "device_type": session.device.type, "threads": torch.get_num_threads(),
        "world_size": session.world_size, "load_average_1min": round(os.getloadavg()[0], 2),
        "malloc_env": {key: value for key, value in os.environ.items() if key.startswith("MALLOC_")},
        "keeps_freed_memory": freed_memory_kept(),
        "precision": session.accelerator.mixed_precision, "precision_setting": stage_cfg.mixed_precision,
        "batch_size": stage_cfg.batch_size, "image_size": cfg.data.image_size, "hole_size": cfg.mask.hole_size,
        "channels_last": stage_cfg.channels_last, "compile": stage_cfg.compile, "data": data,
        "steps": steps, "warmup": warmup, "seconds": round(seconds, 3), "images_per_s": round(images_per_s, 2),
        "step_ms": round(step_ms, 2), "data_wait_ms": round(per_step_ms["data_wait"], 2),
        "g_forward_ms": round(per_step_ms["g_forward"], 2) if stage == "train" else None,
        "d_phase_ms": round(per_step_ms["d_phase"], 2),
        "g_phase_ms": round(per_step_ms["g_phase"], 2) if stage == "train" else None,
        "other_ms": round(step_ms - sum(per_step_ms.values()), 2),
        "peak_host_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "flops": flops, "achieved_tflops": round(achieved / 1e12, 4),
        "peak_tflops": peak / 1e12 if peak else None, "mfu": round(achieved / peak, 4) if peak else None,
        "paper_images_per_s": round(PAPER_IMAGES_PER_S, 1),
        "vs_paper": round(images_per_s / PAPER_IMAGES_PER_S, 4),
        "last_losses": {key: round(float(value), 6) for key, value in losses.items()},
    }


_COLUMNS = (("stage", "stage"), ("D", "discriminator"), ("prec", "precision"), ("batch", "batch_size"),
            ("size", "image_size"), ("img/s", "images_per_s"), ("step ms", "step_ms"),
            ("data ms", "data_wait_ms"), ("G fwd ms", "g_forward_ms"), ("D ms", "d_phase_ms"), ("G ms", "g_phase_ms"),
            ("GFLOP/img", "gflop"), ("GFLOP/s", "achieved_gflops"), ("x matmul", "vs_best_matmul"), ("MFU", "mfu"),
            ("host MiB", "peak_host_mib"), ("GPU MiB", "peak_gpu_mib"), ("x paper", "vs_paper"))


def stage_table(rows: list[dict[str, Any]]) -> str:
    """The figures of `bench_stage` rows as a text table, with the device and the paper's reference."""
    def cell(row: dict[str, Any], key: str) -> str:
        value = round(row["flops"]["step_per_image"] / 1e9, 2) if key == "gflop" else row[key]
        return "-" if value is None else str(value)

    first = rows[0]
    lines = [f"device: {first['device']}, {first['threads']} threads, world size {first['world_size']}; "
             f"data {first['data']}; channels_last {first['channels_last']}, compile {first['compile']}; "
             f"{first['steps']} timed steps after {first['warmup']} warm-up",
             "  ".join(f"{title:>9}" for title, _ in _COLUMNS)]
    lines += ["  ".join(f"{cell(row, key):>9}" for _, key in _COLUMNS) for row in rows]
    for row in rows:
        before, after = row["machine"]["before"], row["machine"]["after"]
        lines.append(f"{row['stage']}: machine before/after, GFLOP/s: matmul fp32 {before['matmul_fp32_gflops']}/"
                     f"{after['matmul_fp32_gflops']}, bf16 {before['matmul_bf16_gflops']}/"
                     f"{after['matmul_bf16_gflops']}; "
                     f"conv3x3 bf16 NCHW {before['conv3x3_bf16_nchw_gflops']}/{after['conv3x3_bf16_nchw_gflops']}, "
                     f"channels_last {before['conv3x3_bf16_channels_last_gflops']}/"
                     f"{after['conv3x3_bf16_channels_last_gflops']}; x matmul = step GFLOP/s / "
                     f"{row['machine']['best_matmul_gflops']} (the best matmul rate)")
    lines.append(f"paper reference: {PAPER_IMAGES_PER_S:.0f} img/s (20 epochs of 28,000 images in 45 min on "
                 f"one RTX 3090); GFLOP/img: one training step, backward taken as 2x forward "
                 f"(pretrain 3 D, train 3 G + 8 D forward passes)")
    return "\n".join(lines)


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
        print(_table(f"train loader: {cfg.data.shards}", [result["loader"]],
                     ["workers", "images_per_s", "first_batch_s"]))
    print(stage_table([result[stage] for stage in stages]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        figures = result if args.command == "all" else result[args.command]
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {minimum}")
        return value
    return parse


def _add_stages(subparsers: Any) -> None:
    helps = {"pretrain": "blur pretraining step images/s", "train": "GAN training step images/s (D and G phases)",
             "all": "loader, pretrain and train into one JSON"}
    for command, text in helps.items():
        parser = subparsers.add_parser(command, help=text)
        parser.add_argument("--steps", type=_count(1), default=20, help="timed steps")
        parser.add_argument("--warmup", type=_count(0), default=3, help="untimed steps first")
        parser.add_argument("--batch-size", type=_count(0), default=0, help="default: the stage's batch_size")
        parser.add_argument("--data", choices=("synthetic", "shards"), default="synthetic",
                            help="one random batch on the device (compute alone) or the real loader")
        parser.add_argument("--rate-size", type=_count(0), default=0,
                            help="matmul side of the machine-rate measurement (default 2048 CPU, 8192 GPU)")
        parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
        add_config_arguments(parser)
        parser.set_defaults(func=run_stages)


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


def _add_matrix(subparsers: Any) -> None:
    parser = subparsers.add_parser("matrix", help="train step: fp32/bf16 x eager/compiled x hybrid/pathak (GPU)")
    parser.add_argument("--steps", type=_count(1), default=20, help="timed steps per cell")
    parser.add_argument("--warmup", type=_count(0), default=5, help="untimed steps first (compilation)")
    parser.add_argument("--batch-size", type=_count(0), default=0, help="default: train.batch_size")
    parser.add_argument("--rate-size", type=_count(0), default=0, help="matmul side of the machine rates")
    parser.add_argument("--budget-s", type=_count(1), default=420, help="start no cell after this many seconds")
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU (use tiny sizes)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled cells (CPU dry run)")
    parser.add_argument("--json", default=None, help="default benchmarks/results/<device>.json")
    add_config_arguments(parser)
    parser.set_defaults(func=run_matrix)


SUBCOMMANDS: list[Callable[[Any], None]] = [_add_loader, _add_stages, _add_matrix]


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser("hybridgan.bench", __doc__.splitlines()[0], [
        "python -m hybridgan.bench train --config configs/paper.yaml --steps 2 --warmup 1 train.cpu=true",
        "python -m hybridgan.bench loader --shards shards/synthetic --workers 1,2",
        "python -m hybridgan.bench matrix --json benchmarks/results/gpu.json"])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    if args.print_config:
        config_from_args(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
