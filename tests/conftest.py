"""Shared fixtures: a tiny synthetic pack and a tiny config, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hybridgan.config import Config, load_config
from hybridgan.pack import pack

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke-cpu.yaml"

TINY_OVERRIDES = [
    "data.image_size=32", "mask.hole_size=16", "generator.base_channels=8", "generator.bottleneck=32",
    "discriminator.decoder_width=4", "discriminator.pathak_channels=8", "data.workers=0",
    "pretrain.batch_size=8", "train.batch_size=8", "pretrain.epochs=1", "train.epochs=1",
    "pretrain.log_every=2", "train.log_every=2", "pretrain.checkpoint_every=3", "train.checkpoint_every=3",
    "pretrain.eval_batches=2", "train.eval_batches=1", "train.eval_every=0", "data.shuffle_buffer=20",
    "discriminator.min_pretrain_accuracy=0",  # a few-step pretraining export is at chance on purpose
]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """synthetic:80 packed in shards of 10 (64 train / 8 val / 8 test)."""
    out = tmp_path_factory.mktemp("shards") / "synthetic"
    cfg = load_config(SMOKE, ["pack.shard_size=10", "pack.val_fraction=0.1", "pack.test_fraction=0.1"])
    pack("synthetic:80", out, cfg.pack, workers=1)
    return out


def tiny_config(shards: Path, runs: Path, *overrides: str) -> Config:
    """The smoke config shrunk to 32x32 images and narrow models, on `shards`, writing into `runs`."""
    return load_config(SMOKE, [*TINY_OVERRIDES, f"data.shards={shards}", f"run.root={runs}",
                               "run.name=t", *overrides])


def tiny_args(shards: Path, runs: Path, *overrides: str) -> list[str]:
    """Command-line arguments of a stage CLI for `tiny_config`."""
    return ["--config", str(SMOKE), *TINY_OVERRIDES, f"data.shards={shards}", f"run.root={runs}",
            "run.name=t", *overrides]


@pytest.fixture(autouse=True)
def _single_thread_per_test_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Subprocesses started by tests inherit a thread cap, so 2-rank runs do not fight for 2 cores."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
