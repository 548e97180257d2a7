"""The figures of a timed stage: FLOPs per step, images/s, phases, memory, MFU, and their table."""

from __future__ import annotations

import os
import resource
from typing import Any

import torch

from hybridgan.bench.measure import PAPER_IMAGES_PER_S, PhaseTimer, device_name, peak_flops
from hybridgan.config import Config
from hybridgan.host_memory import freed_memory_kept
from hybridgan.models import model_summary
from hybridgan.session import TrainingSession


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

def step_figures(cfg: Config, stage: str, session: TrainingSession, timer: PhaseTimer, flops: dict[str, Any],
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
