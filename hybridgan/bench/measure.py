"""What the benchmarks share: the timer of a step's phases, the device's name and peak, the machine's
own matmul and convolution rates, and the text tables and argument types of the subcommands."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

from hybridgan.devices import native_bf16

PAPER_IMAGES_PER_S = 20 * 28_000 / (45 * 60)
"""The paper's only speed figure (§3): 20 epochs of 28,000 images in about 45 min on one RTX 3090."""

PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
                   ("RTX 3090", 71e12))
"""Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, first match wins; MFU's denominator."""

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


def table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> str:
    """`title`, then `columns` of `rows` right-aligned, one line per row."""
    lines = [title, "  ".join(f"{c:>14}" for c in columns)]
    lines += ["  ".join(f"{row[c]:>14}" for c in columns) for row in rows]
    return "\n".join(lines)


def count_arg(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`, else an error naming the text."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {minimum}")
        return value
    return parse
