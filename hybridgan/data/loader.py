"""The data loader: a WebDataset pipeline over one split of a pack, deterministic to the bit.

`make_loader(cfg, split, batch_size=..., epoch=..., rank=..., world_size=...)` returns a DataLoader of
dict batches `{"image": float [B,3,S,S] in [-1,1], "key": [str]}`, plus `"blurred"` (same frame
with the blur square, DESIGN.md) and `"blur_target"` (float [B,1,S,S]: 0 inside the square, 1 outside,
fractional on edge pixels) when `with_blur`. Build one loader per epoch: the epoch is part of its seed.

Who reads what (no torch.distributed calls: rank and world size are arguments):
- default (`data.resampled=false`): the split's shards (manifest order, already hash-shuffled by the
  pack) go round-robin to ranks, then each rank's shards round-robin to its W = min(data.workers,
  its shard count) workers. This assignment is the same every epoch, so every epoch has the same
  number of batches; each worker reads its shards in an order shuffled per epoch. One epoch over all
  ranks sees every sample exactly once.
- `data.resampled=true`: every worker draws shards with replacement from the whole split, and each
  rank yields `data.samples_per_epoch` samples per epoch (0: the split size / world size).

Randomness is a pure function of (run.seed, epoch, rank, worker, sample key), never of global RNG
state: shard order and the shuffle buffer from (seed, epoch, rank, worker); crop, flip and blur from
(seed, epoch, key). Evaluation splits are not shuffled or augmented, and their blur depends on
(seed, key) only, so every evaluation sees identical batches.

Batches are built inside each worker; the DataLoader interleaves workers' batches in a fixed
round-robin order. Training (`train=True`) drops each worker's last partial batch so that every batch
is full; evaluation keeps it so that every sample is seen. `batches_per_epoch` returns the number of
batches that every rank is guaranteed to yield (the minimum over ranks): a training loop that runs
exactly that many steps on every rank keeps DDP ranks in lockstep.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hybridgan.config import BlurConfig, Config
from hybridgan.data.blur import blur_square, blur_target
from hybridgan.data.manifest import shard_entries, split_count


class LoaderError(ValueError):
    """A split that cannot be read as asked (e.g. a rank without shards); one line naming the fix."""


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from `parts`, the same in every process and Python run (unlike hash())."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class _Assignment:
    """What one rank reads in one epoch: per worker, the shard paths in order and a sample limit."""

    urls: tuple[tuple[str, ...], ...]
    counts: tuple[int, ...]
    resampled: bool


def _assign(cfg: Config, split: str, *, train: bool, epoch: int, rank: int, world_size: int,
            workers: int) -> _Assignment:
    entries = shard_entries(cfg.data.shards, split)
    paths = [f"{cfg.data.shards}/{e['name']}" for e in entries]
    if cfg.data.resampled:
        total = cfg.data.samples_per_epoch or math.ceil(split_count(cfg.data.shards, split) / world_size)
        n = max(1, workers)
        counts = tuple(total // n + (1 if w < total % n else 0) for w in range(n))
        return _Assignment(tuple(tuple(paths) for _ in range(n)), counts, True)
    mine = list(range(rank, len(entries), world_size))
    if not mine:
        raise LoaderError(f"{cfg.data.shards}: the {split} split has {len(entries)} shard(s), fewer than "
                          f"the {world_size} ranks; re-pack with a smaller pack.shard_size or set "
                          f"data.resampled=true")
    n = max(1, min(workers, len(mine)))
    urls, counts = [], []
    for w in range(n):
        ours = mine[w::n]
        if train:
            random.Random(stable_seed(cfg.run.seed, epoch, rank, w, "shards")).shuffle(ours)
        urls.append(tuple(paths[i] for i in ours))
        counts.append(sum(entries[i]["count"] for i in ours))
    return _Assignment(tuple(urls), tuple(counts), False)


@dataclass(frozen=True)
class _Options:
    image_size: int
    crop_fraction: float
    hflip: bool
    train: bool
    with_blur: bool
    blur: BlurConfig
    seed: int
    epoch: int
    rank: int
    batch_size: int
    shuffle_buffer: int


def _crop_flip(frame: int, opts: _Options, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], bool]:
    """The crop box (left, top, right, bottom) in the source frame, and whether to flip."""
    if not opts.train:
        return (0, 0, frame, frame), False
    side = round(frame * opts.crop_fraction)
    top, left = (int(v) for v in rng.integers(0, frame - side + 1, size=2))
    flip = bool(opts.hflip and rng.random() < 0.5)
    return (left, top, left + side, top + side), flip


def _resize(image: Image.Image, size: int, box: tuple[float, ...], flip: bool,
            resample: int = Image.BILINEAR) -> Image.Image:
    image = image.resize((size, size), resample, box=box)
    return image.transpose(Image.FLIP_LEFT_RIGHT) if flip else image


def _decode(sample: dict[str, Any], opts: _Options) -> dict[str, Any]:
    """One sample's arrays; a sample that does not decode is a LoaderError naming shard and key."""
    try:
        return _decode_arrays(sample, opts)
    except (KeyError, OSError, SyntaxError, ValueError) as err:
        raise LoaderError(f"{sample.get('__url__', '?')}: sample {sample.get('__key__')}: not a readable "
                          f"JPEG ({err}); re-pack the dataset (python -m hybridgan.pack)") from None


def _decode_arrays(sample: dict[str, Any], opts: _Options) -> dict[str, Any]:
    """One sample's arrays: image (and blurred, blur_target) at image_size, uint8 / float32."""
    key = sample["__key__"]
    rng = np.random.default_rng(stable_seed(opts.seed, opts.epoch if opts.train else "eval", key))
    image = Image.open(io.BytesIO(sample["jpg"]))
    frame = image.size[0]
    box, flip = _crop_flip(frame, opts, rng)
    size = opts.image_size
    if not opts.with_blur:
        # Decode the JPEG at the smallest DCT scale that still gives >= size pixels across the crop.
        wanted = math.ceil(frame * size / (box[2] - box[0]))
        image.draft("RGB", (wanted, wanted))
        scale = image.size[0] / frame
        out = _resize(image.convert("RGB"), size, tuple(v * scale for v in box), flip)
        return {"key": key, "image": np.asarray(out)}
    source = np.asarray(image.convert("RGB"))
    blurred, square = blur_square(source, rng, opts.blur)
    target = Image.fromarray(blur_target(frame, square), mode="F")
    return {"key": key,
            "image": np.asarray(_resize(Image.fromarray(source), size, box, flip)),
            "blurred": np.asarray(_resize(Image.fromarray(blurred), size, box, flip)),
            "blur_target": np.asarray(_resize(target, size, box, flip, Image.BOX))}


def _to_float(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 arrays -> float [B,3,H,W] in [-1, 1]. In NumPy: small torch ops in the main
    process pay for intra-op thread hand-offs (several times slower on a busy 2-core machine)."""
    batch = np.stack(images).transpose(0, 3, 1, 2).astype(np.float32, order="C")
    batch *= 1 / 127.5
    batch -= 1.0
    return torch.from_numpy(batch)


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {"key": [s["key"] for s in samples],
                             "image": _to_float([s["image"] for s in samples])}
    if "blurred" in samples[0]:
        batch["blurred"] = _to_float([s["blurred"] for s in samples])
        batch["blur_target"] = torch.from_numpy(np.stack([s["blur_target"] for s in samples]))[:, None]
    return batch


def _resampled_urls(urls: tuple[str, ...], rng: random.Random) -> Iterator[dict[str, str]]:
    while True:
        yield {"url": rng.choice(urls)}


class _SplitStream(IterableDataset):
    """The batches of one rank for one epoch; each DataLoader worker reads its own shards."""

    def __init__(self, assignment: _Assignment, opts: _Options):
        super().__init__()
        self.assignment, self.opts = assignment, opts

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        opts, urls = self.opts, self.assignment.urls[worker]
        rng = random.Random(stable_seed(opts.seed, opts.epoch, opts.rank, worker, "samples"))
        if self.assignment.resampled:
            draws = random.Random(stable_seed(opts.seed, opts.epoch, opts.rank, worker, "resample"))
            shards: Any = lambda: _resampled_urls(urls, draws)
        else:
            shards = wds.SimpleShardList(list(urls))
        stages: list[Any] = [shards, wds.tarfile_to_samples()]
        if opts.train:
            stages.append(wds.shuffle(opts.shuffle_buffer, initial=opts.shuffle_buffer, rng=rng))
        stages += [wds.map(lambda s: _decode(s, opts)),
                   lambda src: islice(src, self.assignment.counts[worker]),
                   wds.batched(opts.batch_size, collation_fn=_collate, partial=not opts.train)]
        return iter(wds.DataPipeline(*stages))


def _options(cfg: Config, *, batch_size: int, epoch: int, rank: int, train: bool,
             with_blur: bool) -> _Options:
    return _Options(cfg.data.image_size, cfg.data.crop_fraction, cfg.data.hflip, train, with_blur,
                    cfg.blur, cfg.run.seed, epoch, rank, batch_size, cfg.data.shuffle_buffer)


def make_loader(cfg: Config, split: str, *, batch_size: int, epoch: int = 0, rank: int = 0,
                world_size: int = 1, train: bool | None = None, with_blur: bool = False,
                workers: int | None = None) -> DataLoader:
    """The batches of `split` for `rank` of `world_size` in `epoch` (see the module docstring).

    `train` (default: split == "train") turns on shuffling, crop/flip augmentation and full batches
    only; `workers` (default data.workers; 0 = in this process) caps the DataLoader workers.
    """
    train = split == "train" if train is None else train
    workers = cfg.data.workers if workers is None else workers
    assignment = _assign(cfg, split, train=train, epoch=epoch, rank=rank, world_size=world_size,
                         workers=workers)
    opts = _options(cfg, batch_size=batch_size, epoch=epoch, rank=rank, train=train, with_blur=with_blur)
    num_workers = len(assignment.urls) if workers > 0 else 0
    return DataLoader(_SplitStream(assignment, opts), batch_size=None, num_workers=num_workers,
                      prefetch_factor=4 if num_workers else None)


def batches_per_epoch(cfg: Config, split: str, batch_size: int, world_size: int, *,
                      train: bool | None = None, workers: int | None = None) -> int:
    """Batches per epoch that every one of `world_size` ranks yields (same `train`/`workers` as the loader)."""
    train = split == "train" if train is None else train
    workers = cfg.data.workers if workers is None else workers
    per_rank = []
    for rank in range(world_size):
        counts = _assign(cfg, split, train=train, epoch=0, rank=rank, world_size=world_size,
                         workers=workers).counts
        per_worker = [n // batch_size if train else math.ceil(n / batch_size) for n in counts]
        per_rank.append(sum(per_worker))
    return min(per_rank)
