"""The host allocator setting of CPU training runs (hybridgan/host_memory.py)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from conftest import REPO, tiny_config
from hybridgan import host_memory
from hybridgan.session import TrainingSession

# In a fresh process (the setting is process-wide): where a freed 64 MiB block lives, before and after.
PROBE = """
import ctypes, json
from hybridgan.host_memory import freed_memory_kept, keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, (ctypes.c_void_p,)

def block_of_64_mib():
    block = libc.malloc(64 << 20)
    mapped = libc.mallinfo2().hblkhd
    libc.free(block)
    return {"mmapped_bytes": mapped, "heap_bytes_after_free": libc.mallinfo2().arena}

before, kept_before = block_of_64_mib(), freed_memory_kept()
applied = keep_freed_memory()
print(json.dumps({"before": before, "kept_before": kept_before, "applied": applied, "kept": freed_memory_kept(),
                  "after": block_of_64_mib()}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_keep_freed_memory_makes_glibc_serve_a_large_block_from_the_heap_and_keep_it():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout)
    assert probe["before"]["mmapped_bytes"] >= 64 << 20  # glibc's default: mapped, then unmapped by free
    assert probe["before"]["heap_bytes_after_free"] < 64 << 20
    assert probe["applied"] is probe["kept"] is True and probe["kept_before"] is False
    assert probe["after"]["mmapped_bytes"] < 64 << 20  # from the heap ...
    assert probe["after"]["heap_bytes_after_free"] >= 64 << 20  # ... which keeps it once freed


def test_keep_freed_memory_changes_nothing_on_another_c_library(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert host_memory.keep_freed_memory() is False


@pytest.mark.parametrize("stage", ["pretrain", "train"])
def test_cpu_training_stages_keep_freed_memory(tiny_shards, tmp_path, monkeypatch, stage):
    calls = []
    monkeypatch.setattr("hybridgan.session.keep_freed_memory", lambda: calls.append(True) or True)
    cfg = tiny_config(tiny_shards, tmp_path)
    session = TrainingSession(cfg, stage, getattr(cfg, stage))
    session.close()
    assert session.device.type == "cpu" and calls == [True]
