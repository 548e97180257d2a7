"""The data loader: exact epochs of one split of a pack on any number of ranks and workers.

`SplitLoader(cfg, split, batch_size=B, rank=r, world_size=R, ...)` is built once per run; calling it
with an epoch (`loader(epoch)`, or `loader(epoch, start=j)` to begin at batch j) returns that epoch's
batches for rank r: dicts `{"image": uint8 [b,3,S,S], "key": [str]}`, plus `"blurred"` (uint8, the
frame with the blur square) and `"blur_target"` (float32 [b,1,S,S]: 0 inside the square, 1 outside,
fractional on edge pixels) and `"blur_variance"` (float32 [b], the Gaussian's variance in the frame) when `with_blur`. `to_device(batch, device)` moves a batch to the device
and turns its uint8 images into float in [-1, 1] there. `make_loader` is the one-shot form for
evaluation passes. `train_loader` gives the training loops this loader or, with `data.resident`, the
split decoded once into device memory (hybridgan/data/resident.py). Both read the epoch plan of
hybridgan/data/plan.py and the samples of hybridgan/data/samples.py. See docs/data-loading.md for the
design and its reasons.

The epoch as a global sample sequence (a pure function of the manifest, run.seed and the epoch):
- training: the split's shards in an order shuffled per (seed, epoch); consecutive shards holding at
  least `data.shuffle_buffer` samples form a group whose samples are permuted together per
  (seed, epoch, group). With `data.resampled=true` the shards are drawn with replacement instead,
  until the sequence holds `data.samples_per_epoch` samples (0: the split size).
- evaluation: the shards and their samples in pack order.

`batch_size` is the global batch B; rank r of R takes b = B / R samples of every global step. Training
step g covers sequence positions [g*B, (g+1)*B), rank r the slice [g*B + r*b, g*B + (r+1)*b); an epoch
has len(sequence) // B steps for every R, so every image is seen once per epoch, less fewer than B.
Evaluation keeps the partial last batch: rank r takes batches j = r, r + R, ... of size B of the
sequence. DataLoader worker w of W produces the rank's batches j with j % W == w, so PyTorch's
in-order round-robin yields batches in order: global step g sees the same B images whatever R and W.

Augmentation (random crop, flip, blur) comes from (seed, epoch, key), evaluation's blur from (seed, key):
never from global RNG state, ranks or workers.
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal
import weakref
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hybridgan.config import Config
from hybridgan.data.blur import blur_in, blur_target, draw_square
from hybridgan.data.plan import (BatchPlan, EpochPlanner, LoaderError, SplitLayout, batches_per_epoch, epoch_sequence,
                                 stable_seed)
from hybridgan.data.preprocess import face_pixels
from hybridgan.data.resident import ResidentLoader
from hybridgan.data.samples import SampleOptions, augmentation, open_frame, read_shard, sample_options

__all__ = ["BatchPlan", "EpochPlanner", "LoaderError", "SplitLayout", "SplitLoader", "augmentation",
           "batches_per_epoch", "decode_sample", "epoch_sequence", "make_loader", "open_frame", "read_shard",
           "sample_options", "stable_seed", "to_device", "train_loader"]


def decode_sample(key: str, jpeg: bytes, opts: SampleOptions, epoch: int, url: str = "?") -> dict[str, Any]:
    """One sample's arrays (see `_decode_arrays`)."""
    return _decode_arrays(key, open_frame(key, jpeg, url), opts, epoch)


def _decode_arrays(key: str, frame: Image.Image, opts: SampleOptions, epoch: int) -> dict[str, Any]:
    """image (and blurred, blur_target) at image_size: uint8 [S,S,3] / float32 [S,S], through
    hybridgan.data.preprocess (a random crop and flip in training, the centred crop otherwise)."""
    side = frame.size[0]
    box, flip, rng = augmentation(opts, epoch, key, side)
    size = opts.image_size
    arrays = {"key": key, "image": face_pixels(frame, size, box, flip)}
    if opts.with_blur:
        pixels = np.asarray(frame)
        square, variance = draw_square(rng, opts.blur, *pixels.shape[:2], epoch if opts.train else None)
        target = Image.fromarray(blur_target(side, square), mode="F")
        arrays["blurred"] = face_pixels(Image.fromarray(blur_in(pixels, square, variance)), size, box, flip)
        arrays["blur_variance"] = variance
        arrays["blur_target"] = face_pixels(target, size, box, flip, Image.BOX)
    return arrays


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """uint8 [B,3,S,S] images (contiguous), float32 [B,1,S,S] blur targets, the keys."""
    def images(name: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.stack([s[name] for s in samples]).transpose(0, 3, 1, 2)))

    batch: dict[str, Any] = {"key": [s["key"] for s in samples], "image": images("image")}
    if "blurred" in samples[0]:
        batch["blurred"] = images("blurred")
        batch["blur_target"] = torch.from_numpy(np.stack([s["blur_target"] for s in samples]))[:, None]
        batch["blur_variance"] = torch.tensor([s["blur_variance"] for s in samples], dtype=torch.float32)
    return batch


def to_device(batch: dict[str, Any], device: torch.device | str, non_blocking: bool = True) -> dict[str, Any]:
    """`batch` on `device`: uint8 images become float in [-1, 1] there (x * (1 / 127.5) - 1), other tensors
    are moved as they are. Tensors already in float pass unchanged, so calling it twice is harmless."""
    moved: dict[str, Any] = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=non_blocking)
            if value.dtype == torch.uint8:
                value = value.float().mul_(1 / 127.5).sub_(1.0)
        moved[name] = value
    return moved


class _EpochBatches(IterableDataset):
    """The batches of one rank; the epoch and first batch come through shared memory, so that
    persistent DataLoader workers serve every epoch of the run."""

    def __init__(self, planner: EpochPlanner, opts: SampleOptions) -> None:
        super().__init__()
        self.planner, self.layout, self.opts = planner, planner.layout, opts
        self.epoch_and_start = multiprocessing.RawArray("q", 2)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start = self.epoch_and_start
        sequence, plan = self.planner.plan(epoch)
        batches = plan.worker_batches(worker, workers, start)
        if not batches:
            return
        ids = [sequence[p] for p in plan.positions(batches)]
        offsets = self.layout.offsets
        shards = [np.searchsorted(offsets, i, side="right") - 1 for i in ids]
        last_use = {int(s): n for n, batch_shards in enumerate(shards) for s in np.unique(batch_shards)}
        cache: dict[int, list[tuple[str, bytes]]] = {}
        for n, (batch_ids, batch_shards) in enumerate(zip(ids, shards)):
            samples = []
            for sample_id, shard in zip(batch_ids.tolist(), batch_shards.tolist()):
                if shard not in cache:
                    cache[shard] = read_shard(self.layout.paths[shard], self.layout.counts[shard])
                key, jpeg = cache[shard][sample_id - int(offsets[shard])]
                samples.append(decode_sample(key, jpeg, self.opts, epoch, self.layout.paths[shard]))
            yield _collate(samples)
            for shard in [s for s in cache if last_use[s] <= n]:
                del cache[shard]


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave SIGTERM, SIGINT and SIGUSR1 to the main process, which checkpoints and exits
    (a signal to the process group reaches them too); they still end with it."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def _end_workers_at_exit() -> None:
    """Workers ignore SIGTERM, so multiprocessing's own exit hook (terminate, then join without a
    timeout) would wait forever for any worker still alive at exit, e.g. one of an iterator that an
    exception kept from being closed: kill those first. Registered after multiprocessing's hook, so
    it runs before it."""
    for process in multiprocessing.active_children():
        if process.daemon:
            process.kill()
            process.join(timeout=5)


atexit.register(_end_workers_at_exit)


def _shut_down(loader: DataLoader) -> None:
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


class SplitLoader:
    """One rank's loader of `split` for a whole run: `loader(epoch, start=0)` iterates that epoch's
    batches from batch `start` on (see the module docstring). Build it once: its DataLoader workers
    persist across epochs.

    `batch_size` is the global batch (a multiple of `world_size`); `train` (default: split == "train")
    turns on shuffling, augmentation and full batches only; `workers` (default data.workers; 0 = in this
    process); `pin_memory` (default: when CUDA is available) pins batches for non-blocking copies.
    """

    def __init__(self, cfg: Config, split: str, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 train: bool | None = None, with_blur: bool = False, workers: int | None = None,
                 pin_memory: bool | None = None, persistent: bool = True) -> None:
        train = split == "train" if train is None else train
        workers = cfg.data.workers if workers is None else workers
        planner = EpochPlanner.of(cfg, SplitLayout.read(cfg, split), train=train, batch_size=batch_size,
                                  rank=rank, world_size=world_size)
        self.batches = _EpochBatches(planner, sample_options(cfg, train, with_blur))
        planner.plan(0)  # a bad batch size fails here, before any worker starts
        pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.loader = DataLoader(self.batches, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                 prefetch_factor=4 if workers else None,
                                 persistent_workers=persistent and workers > 0,
                                 worker_init_fn=_ignore_stop_signals if workers else None)
        # Workers ignore SIGTERM, so multiprocessing's exit hook (terminate, then join) would wait for
        # them forever: shut them down through their queues first.
        weakref.finalize(self, _shut_down, self.loader)

    def __len__(self) -> int:
        """This rank's batches per epoch (of epoch 0; the same every epoch unless data.resampled)."""
        return self.batches.planner.plan(0)[1].batches

    def __call__(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        self.batches.epoch_and_start[:] = [epoch, start]
        return iter(self.loader)


def make_loader(cfg: Config, split: str, *, batch_size: int, epoch: int = 0, **options: Any) -> Iterator[dict[str, Any]]:
    """The batches of one pass over `split` in `epoch` (an evaluation pass, a test); the options are
    SplitLoader's. Its workers end with the pass."""
    return SplitLoader(cfg, split, batch_size=batch_size, persistent=False, **options)(epoch)


def train_loader(cfg: Config, split: str, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", with_blur: bool = False) -> SplitLoader | ResidentLoader:
    """The training loop's loader of `split`: the split decoded once into `device` memory
    (`data.resident`, see hybridgan/data/resident.py) or the worker loader. Pretraining (`with_blur`)
    keeps the worker loader, whose blur is made on the CPU; with data.resident set it says so."""
    if cfg.data.resident and not with_blur:
        return ResidentLoader(cfg, split, batch_size=batch_size, rank=rank, world_size=world_size, device=device)
    if cfg.data.resident and rank == 0:
        print("data.resident: pretraining reads its batches with the worker loader (the blur is made on the CPU)")
    return SplitLoader(cfg, split, batch_size=batch_size, rank=rank, world_size=world_size, with_blur=with_blur)
