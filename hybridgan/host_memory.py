"""The host allocator of a CPU training run: glibc keeps the memory a step frees for the next step.

glibc's malloc serves blocks above its mmap threshold (128 KiB, growing to at most 32 MiB) with a
fresh `mmap` and returns them to the system on `free`, and trims the heap's free top above 128 KiB.
A training step on the CPU allocates the same large tensors every step: in the Pathak GAN step at
the paper's size, the two weight gradients of G's 4000-channel bottleneck (131 MB each in float32),
their bf16 products and the weights' bf16 copies under autocast. Each one was mapped afresh and
page-faulted in at every step, then unmapped by `zero_grad`: measured at batch 16, one thread, about
65 ms per weight-gradient product and 9 ms per `zero_grad`, a fifth of a 595 ms step.

`keep_freed_memory` sets `M_MMAP_MAX` to 0 (every block from the heap) and `M_TRIM_THRESHOLD` to -1
(the heap is never trimmed), the `mallopt` equivalents of `MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=<huge>`: a freed block stays mapped and the next step's block of the same
size reuses it. The process keeps its peak heap for its lifetime, which a training run reaches in
its first step anyway. It is process-wide and applies to the blocks allocated after the call.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
"""`mallopt` parameter numbers from glibc's <malloc.h>."""

_kept = False  # whether `keep_freed_memory` took effect in this process (glibc cannot be asked)


def _glibc() -> ctypes.CDLL | None:
    """The C library of this process when it is glibc with `mallopt`, else None (musl, macOS, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)  # the symbols of the running process, its C library included
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory mapped for reuse (module docstring); True when both settings
    took effect, False on another C library, where nothing is changed."""
    global _kept
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    _kept = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
    return _kept


def freed_memory_kept() -> bool:
    """Whether `keep_freed_memory` has taken effect in this process (recorded by `hybridgan.bench`)."""
    return _kept
