"""The data loader: exact epochs of one split of a pack on any number of ranks and workers.

`SplitLoader(cfg, split, batch_size=B, rank=r, world_size=R, ...)` is built once per run; calling it
with an epoch (`loader(epoch)`, or `loader(epoch, start=j)` to begin at batch j) returns that epoch's
batches for rank r: dicts `{"image": uint8 [b,3,S,S], "key": [str]}`, plus `"blurred"` (uint8, the
frame with the blur square) and `"blur_target"` (float32 [b,1,S,S]: 0 inside the square, 1 outside,
fractional on edge pixels) and `"blur_variance"` (float32 [b], the Gaussian's variance in the frame) when `with_blur`. `to_device(batch, device)` moves a batch to the device
and turns its uint8 images into float in [-1, 1] there. `make_loader` is the one-shot form for
evaluation passes. `train_loader` gives the training loops this loader or, with `data.resident`, the
split decoded once into device memory (hybridgan/data/resident.py). See docs/data-loading.md for the
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
import hashlib
import io
import math
import multiprocessing
import re
import signal
import tarfile
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hybridgan.config import BlurConfig, Config
from hybridgan.data.blur import blur_in, blur_target, draw_square
from hybridgan.data.manifest import shard_entries
from hybridgan.data.preprocess import Box, crop_box, face_pixels

if TYPE_CHECKING:
    from hybridgan.data.resident import ResidentLoader


class LoaderError(ValueError):
    """A split that cannot be read as asked (a bad batch size, an unreadable shard); one line."""


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from `parts`, the same in every process and Python run (unlike hash())."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class SplitLayout:
    """A split's shards as the manifest lists them: file paths and sample counts, in pack order."""

    paths: tuple[str, ...]
    counts: tuple[int, ...]

    @classmethod
    def read(cls, cfg: Config, split: str) -> SplitLayout:
        entries = shard_entries(cfg.data.shards, split)
        return cls(tuple(f"{cfg.data.shards}/{e['name']}" for e in entries),
                   tuple(int(e["count"]) for e in entries))

    @property
    def offsets(self) -> np.ndarray:
        """Sample id of each shard's first sample (sample id = offset + index in the shard)."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)


def epoch_sequence(layout: SplitLayout, *, seed: int, epoch: int, train: bool, mix: int = 1,
                   resampled: bool = False, samples: int = 0) -> np.ndarray:
    """The epoch's global sample sequence: sample ids (see SplitLayout.offsets), int64.

    Training: shards shuffled per (seed, epoch) (or drawn with replacement when `resampled`, until
    `samples` samples, 0 = the split size), consecutive shards holding >= `mix` samples permuted
    together per (seed, epoch, group). Evaluation: pack order.
    """
    offsets, counts = layout.offsets, np.asarray(layout.counts, dtype=np.int64)
    if not train:
        return np.arange(int(counts.sum()), dtype=np.int64)
    rng = np.random.default_rng(stable_seed(seed, epoch, "shards"))
    if resampled:
        wanted = samples or int(counts.sum())
        order, drawn = [], 0
        while drawn < wanted:
            order.append(int(rng.integers(len(counts))))
            drawn += layout.counts[order[-1]]
    else:
        order = [int(i) for i in rng.permutation(len(counts))]
    pieces, group, held = [], [], 0
    for shard in order:
        group.append(np.arange(offsets[shard], offsets[shard] + counts[shard], dtype=np.int64))
        held += int(counts[shard])
        if held >= mix:
            pieces.append(_permuted(group, seed, epoch, len(pieces)))
            group, held = [], 0
    if group:
        pieces.append(_permuted(group, seed, epoch, len(pieces)))
    sequence = np.concatenate(pieces)
    return sequence[:samples] if resampled and samples else sequence


@dataclass(frozen=True)
class EpochPlanner:
    """A split's epoch sequences and one rank's BatchPlan of them: what every loader of the split
    shares (the worker loader and the resident one)."""

    layout: SplitLayout
    sequence_args: dict[str, Any]
    plan_args: dict[str, Any]

    @classmethod
    def of(cls, cfg: Config, layout: SplitLayout, *, train: bool, batch_size: int, rank: int,
           world_size: int) -> EpochPlanner:
        return cls(layout, dict(seed=cfg.run.seed, train=train, mix=cfg.data.shuffle_buffer,
                                resampled=cfg.data.resampled, samples=cfg.data.samples_per_epoch),
                   dict(batch_size=batch_size, rank=rank, world_size=world_size, train=train))

    def plan(self, epoch: int) -> tuple[np.ndarray, BatchPlan]:
        """The epoch's global sample sequence and this rank's plan of it."""
        sequence = epoch_sequence(self.layout, epoch=epoch, **self.sequence_args)
        return sequence, BatchPlan(len(sequence), **self.plan_args)


def _permuted(group: list[np.ndarray], seed: int, epoch: int, index: int) -> np.ndarray:
    ids = np.concatenate(group)
    return ids[np.random.default_rng(stable_seed(seed, epoch, "group", index)).permutation(len(ids))]


@dataclass(frozen=True)
class BatchPlan:
    """Which sequence positions rank `rank` of `world_size` reads, batch by batch, in one epoch."""

    length: int  # samples in the epoch's sequence
    batch_size: int  # global batch B
    rank: int
    world_size: int
    train: bool

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.batch_size % self.world_size:
            raise LoaderError(f"batch size {self.batch_size} is not a positive multiple of the world size "
                              f"{self.world_size}: every rank takes an equal share of the global batch")

    @property
    def batches(self) -> int:
        """This rank's batches per epoch (training: the same on every rank)."""
        if self.train:
            return self.length // self.batch_size
        return len(range(self.rank, math.ceil(self.length / self.batch_size), self.world_size))

    def positions(self, batches: range) -> list[np.ndarray]:
        """Sequence positions of this rank's batches `batches` of the epoch, one array per batch."""
        if self.train:
            per_rank = self.batch_size // self.world_size
            first = np.asarray(batches)[:, None] * self.batch_size + self.rank * per_rank
            return list(first + np.arange(per_rank))
        firsts = [(self.rank + j * self.world_size) * self.batch_size for j in batches]
        return [np.arange(first, min(first + self.batch_size, self.length)) for first in firsts]

    def worker_batches(self, worker: int, workers: int, start: int = 0) -> range:
        """The batches worker `worker` of `workers` (>= 1) produces, from batch `start` on."""
        return range(start + worker, self.batches, workers)


def batches_per_epoch(cfg: Config, split: str, batch_size: int, *, train: bool | None = None) -> int:
    """Optimisation steps per epoch for a global batch of `batch_size` on any world size (training),
    or batches of an evaluation pass on one rank (`train=False`, the partial last batch counted)."""
    train = split == "train" if train is None else train
    layout = SplitLayout.read(cfg, split)
    length = len(_sequence(cfg, layout, epoch=0, train=train))
    return BatchPlan(length, batch_size, 0, 1, train).batches


def _sequence(cfg: Config, layout: SplitLayout, *, epoch: int, train: bool) -> np.ndarray:
    return epoch_sequence(layout, seed=cfg.run.seed, epoch=epoch, train=train, mix=cfg.data.shuffle_buffer,
                          resampled=cfg.data.resampled, samples=cfg.data.samples_per_epoch)


@dataclass(frozen=True)
class _Options:
    """What turns one stored sample into arrays."""

    image_size: int
    crop_fraction: float
    hflip: bool
    train: bool
    with_blur: bool
    blur: BlurConfig
    seed: int


def sample_options(cfg: Config, train: bool, with_blur: bool = False) -> _Options:
    """What `cfg` asks of each sample: training (random crop, flip) or not, with the blur or not."""
    return _Options(cfg.data.image_size, cfg.data.crop_fraction, cfg.data.hflip, train, with_blur, cfg.blur,
                    cfg.run.seed)


def augmentation(opts: _Options, epoch: int, key: str, frame: int) -> tuple[Box, bool, np.random.Generator]:
    """The crop box and flip of sample `key` in `epoch` (training: drawn per (seed, epoch, key);
    otherwise the centred box, no flip), and the generator they were drawn from, which then draws
    the pretraining blur. The one source of both for the worker and the resident loader."""
    rng = np.random.default_rng(stable_seed(opts.seed, epoch if opts.train else "eval", key))
    box = crop_box(frame, opts.crop_fraction, rng if opts.train else None)
    flip = bool(opts.train and opts.hflip and rng.random() < 0.5)
    return box, flip, rng


_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # key and extension, as WebDataset splits them


def read_shard(path: str, count: int) -> list[tuple[str, bytes]]:
    """(key, JPEG bytes) of every sample of the shard at `path`, in tar order; a read error or a
    sample count other than the manifest's `count` is a LoaderError naming the shard."""
    samples: dict[str, bytes] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                match = _MEMBER.match(member.name)
                if member.isfile() and match and match.group(2) == "jpg":
                    samples[match.group(1)] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise LoaderError(f"{path}: cannot read the shard ({err}); re-pack the dataset "
                          f"(python -m hybridgan.pack)") from None
    if len(samples) != count:
        raise LoaderError(f"{path}: the shard holds {len(samples)} samples, the manifest says {count}; "
                          f"re-pack the dataset (python -m hybridgan.pack)")
    return list(samples.items())


def open_frame(key: str, jpeg: bytes, url: str = "?") -> Image.Image:
    """The decoded RGB frame of one sample; a sample that does not decode is a LoaderError naming
    shard and key."""
    try:
        return Image.open(io.BytesIO(jpeg)).convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise LoaderError(f"{url}: sample {key}: not a readable JPEG ({err}); re-pack the dataset "
                          f"(python -m hybridgan.pack)") from None


def decode_sample(key: str, jpeg: bytes, opts: _Options, epoch: int, url: str = "?") -> dict[str, Any]:
    """One sample's arrays (see `_decode_arrays`)."""
    return _decode_arrays(key, open_frame(key, jpeg, url), opts, epoch)


def _decode_arrays(key: str, frame: Image.Image, opts: _Options, epoch: int) -> dict[str, Any]:
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

    def __init__(self, planner: EpochPlanner, opts: _Options) -> None:
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
        from hybridgan.data.resident import ResidentLoader

        return ResidentLoader(cfg, split, batch_size=batch_size, rank=rank, world_size=world_size, device=device)
    if cfg.data.resident and rank == 0:
        print("data.resident: pretraining reads its batches with the worker loader (the blur is made on the CPU)")
    return SplitLoader(cfg, split, batch_size=batch_size, rank=rank, world_size=world_size, with_blur=with_blur)
