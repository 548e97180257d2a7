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


LONGEST_FIRST = ("test_reproduce.py", "test_deepspeed.py", "test_pretrain.py", "test_slurm.py", "test_train.py",
                 "test_session.py")
"""The test files that take longest (pytest's `--durations` in any CI log; single long tests first), collected
first so that the two workers of tests/run.sh (a file each at a time) finish together; only the order changes."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    order = {name: rank for rank, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker's own torch gets its share of the cores, not all of them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _single_thread_per_test_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Subprocesses started by tests inherit a thread cap, so 2-rank runs do not fight for 2 cores."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


@pytest.fixture(scope="session")
def standin_lpips_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised torchvision alexnet's `features.*` state dict: the layout of the real
    staged file (whose `classifier.*` LPIPS ignores), without its 230 MB of classifier."""
    import torch
    import torchvision

    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items() if k.startswith("features.")}
    path = tmp_path_factory.mktemp("weights") / "alexnet-standin.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def standin_inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised state dict of torch-fidelity's InceptionV3 (its staged file's layout).

    torch-fidelity only builds the network from a weights file, so it is built here with its loading
    switched off; the convolutions get He-normal weights so that the features keep an O(1) scale
    through the 90-odd layers (PyTorch's default init shrinks them to ~1e-8)."""
    import torch
    from torch import nn
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    folder = tmp_path_factory.mktemp("weights")
    torch.save({}, folder / "empty.pth")
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, strict=True: None)
        model = FeatureExtractorInceptionV3("standin", ["2048"], feature_extractor_weights_path=str(folder / "empty.pth"))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = folder / "inception-standin.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any weights download (torch.hub, which torchvision and torch-fidelity use) fails the test."""
    import torch.hub

    def refuse(url: str, *args, **kwargs) -> None:
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
