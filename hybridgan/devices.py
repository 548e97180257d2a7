"""The `auto` settings of a stage, resolved for the device the stage runs on.

`mixed_precision: auto` is bf16 where the device computes bf16 natively and fast, fp32 ("no")
elsewhere: a CUDA GPU that supports bf16 (Ampere and later), or a CPU with AVX512-BF16 or AMX-BF16;
under `accelerate launch --mixed_precision bf16|fp16|fp8` it is the launcher's precision instead
(`launched_mixed_precision`).
Measured on an AMD EPYC with AVX512-BF16 (one thread): matmul 109 GFLOP/s fp32, 478 bf16; the
hybrid D's forward+backward 2x faster in bf16. A CPU without those instructions emulates bf16
and runs it slower than fp32.

`channels_last: auto` is channels_last for the hybrid discriminator (ResNet50 + U-Net: its bf16
forward+backward ran 1.25x faster so on that CPU, and convolution networks run in NHWC on GPU tensor
cores) and the plain layout for the other models: the context encoder ran 1.1-1.3x slower in
channels_last on that CPU, and Pathak's discriminator was slower in it on an Intel Xeon.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of CPUs with native bf16 arithmetic."""


def cpu_has_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU's flags name native bf16 instructions (AVX512-BF16 or AMX-BF16)."""
    if not cpuinfo.is_file():
        return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), [])
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def native_bf16(cpu: bool) -> bool:
    """Whether the CPU (`cpu`) or the CUDA device computes bf16 natively (not emulated)."""
    return cpu_has_fast_bf16() if cpu else torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_mixed_precision(setting: str, cpu: bool) -> str:
    """The Accelerator's `mixed_precision` for a stage's `setting` ("no", "fp16", "bf16" or "auto")
    on the CPU (`cpu`) or on CUDA."""
    if setting != "auto":
        return setting
    return "bf16" if native_bf16(cpu) else "no"


def launched_mixed_precision(setting: str, cpu: bool, key: str, launcher: str | None) -> str:
    """The Accelerator's `mixed_precision` for the stage key `key` (e.g. "train.mixed_precision") set
    to `setting`, under a launcher's precision `launcher` (`accelerate launch --mixed_precision`, which
    it passes as ACCELERATE_MIXED_PRECISION; None without a launcher).

    The launcher's "no" is also what `accelerate launch` sets when it was not asked for a precision,
    so it leaves the stage's setting alone. Any other launcher precision replaces `auto` and must agree
    with an explicit setting: ValueError naming both otherwise (the Accelerator would take the stage's
    and ignore the launcher's without a word).
    """
    if launcher in (None, "no", setting):
        return resolve_mixed_precision(setting, cpu)
    if setting == "auto":
        return launcher
    raise ValueError(f"{key}={setting} and the launcher's --mixed_precision {launcher} (ACCELERATE_MIXED_PRECISION) "
                     f"disagree: set {key}={launcher} or auto, or launch without --mixed_precision")


def use_channels_last(setting: bool | str, model: nn.Module) -> bool:
    """Whether `model` runs in channels_last for a stage's `channels_last` setting (true, false or "auto")."""
    if setting != "auto":
        return bool(setting)
    from hybridgan.models import HybridDiscriminator

    return isinstance(model, HybridDiscriminator)
