"""`data.resident`: the training split decoded once into device memory, batches cropped on the device.

`ResidentLoader` is a drop-in for the worker loader of GAN training (`SplitLoader`): the same epoch
sequence, `BatchPlan` and rank slice, the same crop box and flip per (seed, epoch, key) (both come
from `hybridgan.data.samples.augmentation`), and batches of the same uint8 pixels, bit for bit. The
frames (the pack's stored size, e.g. 256 x 256) are decoded once when the loader is built, by
`data.workers` processes, into one uint8 tensor [N, 3, F, F] on the training device; each step then
gathers its frames there and crops + resizes them with `PillowBilinear`, an integer
re-implementation of Pillow's antialiased bilinear resample (`Image.resize(..., BILINEAR, box=...)`,
the worker path's `face_pixels`). docs/data-loading.md says when to use it and how it is tested.

Pillow's 8-bit resample (src/libImaging/Resample.c), which `PillowBilinear` follows step by step:
- coefficients in double (`precompute_coeffs`): scale = (in1 - in0) / out; filterscale = max(scale, 1);
  support = filterscale (bilinear's support is 1); output pixel xx has centre
  in0 + (xx + 0.5) * scale, taps x in [xmin, xmax) with xmin = int(centre - support + 0.5) >= 0 and
  xmax = int(centre + support + 0.5) <= in_size, weights filter((x - centre + 0.5) / filterscale),
  normalised by their sum (added in tap order);
- fixed point (`normalize_coeffs_8bpc`): PRECISION_BITS = 32 - 8 - 2 = 22, each weight
  int(w * 2^22 + 0.5) (away from zero for negative weights, which bilinear never has);
- a horizontal pass, then the vertical pass on its uint8 result; each output is
  clip8(2^21 + sum(pixel * weight)) = clamp((...) >> 22, 0, 255). With 8-bit pixels and weights
  summing to about 2^22 the int32 sums cannot overflow (255 * 2^22 < 2^31).
Where Pillow skips a pass (the box spans the whole axis at the output size), that pass here is the
identity (one tap of weight 2^22). The horizontal pass here runs over every frame row (Pillow's only
over the rows the vertical pass reads): a row's result does not depend on the other rows. Neither
changes a pixel.
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from hybridgan.config import Config
from hybridgan.data.manifest import read_manifest
from hybridgan.data.plan import EpochPlanner, LoaderError, SplitLayout
from hybridgan.data.preprocess import crop_side
from hybridgan.data.samples import augmentation, open_frame, read_shard, sample_options

PRECISION_BITS = 32 - 8 - 2
"""Pillow's fixed-point precision of 8-bit resampling coefficients."""

DEVICE_MARGIN = 0.25
"""Share of the device's memory that must stay free after the frames are stored (models, activations)."""


def bilinear_coefficients(in_size: int, side: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's integer coefficients for resizing [o, o + side) of an axis of `in_size` pixels to
    `out_size` pixels with the antialiased bilinear filter, for every offset o in [0, in_size - side].

    Returns `first` (int64 [offsets, out_size]: the first tap's input pixel) and `weights` (int32
    [offsets, out_size, taps]: 2^22-scaled weights of input pixels first + 0, 1, ..., 0 past the
    last tap), computed with Pillow's float64 operations in Pillow's order.
    """
    scale = float(side) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    taps = math.ceil(support) * 2 + 1
    inv_filterscale = 1.0 / filterscale
    offsets = np.arange(in_size - side + 1, dtype=np.float64)[:, None]
    centre = offsets + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.trunc(centre - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(centre + support + 0.5), in_size).astype(np.int64) - xmin
    weights = np.zeros((*centre.shape, taps), dtype=np.float64)
    total = np.zeros_like(centre)
    for tap in range(taps):
        distance = np.abs(((xmin + tap).astype(np.float64) - centre + 0.5) * inv_filterscale)
        weight = np.where((tap < xmax) & (distance < 1.0), 1.0 - distance, 0.0)
        weights[..., tap] = weight
        total += weight
    weights = weights / total[..., None]  # never 0: a centre is within 1 * filterscale of some tap
    scaled = weights * float(1 << PRECISION_BITS)
    fixed = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    return xmin, fixed


class PillowBilinear:
    """Crops of side round(frame * crop_fraction) of uint8 frames resized to `size`, on `device`,
    with exactly the pixels of `face_pixels` (Pillow's antialiased bilinear resize of the crop box,
    then the optional horizontal flip). The coefficient tables (one per crop offset) are made once."""

    def __init__(self, frame: int, crop_fraction: float, size: int, device: torch.device | str) -> None:
        first, weights = bilinear_coefficients(frame, crop_side(frame, crop_fraction), size)
        index = np.minimum(first[..., None] + np.arange(weights.shape[-1]), frame - 1)
        self.index = torch.from_numpy(index).to(device)  # [offsets, size, taps]: input pixel of each tap
        self.weights = torch.from_numpy(weights).to(device)  # [offsets, size, taps]
        self.size = size

    def __call__(self, frames: torch.Tensor, left: torch.Tensor, top: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, size, size] from uint8 frames [B, 3, F, F] and each crop's `left`, `top`
        (int64 [B]) and `flip` (bool [B]); a flip mirrors the horizontal table's outputs."""
        columns = torch.where(flip[:, None, None], self.index[left].flip(1), self.index[left])
        column_weights = torch.where(flip[:, None, None], self.weights[left].flip(1), self.weights[left])
        batch, channels, rows, _ = frames.shape
        shape = (batch, channels, rows, self.size)
        sums = torch.full(shape, 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=frames.device)
        for tap in range(columns.shape[-1]):
            pixels = frames.gather(3, columns[:, None, None, :, tap].expand(shape))
            sums += pixels.int() * column_weights[:, None, None, :, tap]
        middle = _clip8(sums)
        shape = (batch, channels, self.size, self.size)
        sums = torch.full(shape, 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=frames.device)
        row_index, row_weights = self.index[top], self.weights[top]
        for tap in range(row_index.shape[-1]):
            pixels = middle.gather(2, row_index[:, None, :, tap, None].expand(shape))
            sums += pixels.int() * row_weights[:, None, :, tap, None]
        return _clip8(sums)


def _clip8(sums: torch.Tensor) -> torch.Tensor:
    """Pillow's clip8: the fixed-point sum (rounding term included) to uint8."""
    return (sums >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def _decode_samples(task: tuple[str, int, int, int, int]) -> tuple[list[str], np.ndarray]:
    """Keys and uint8 frames [n, 3, frame, frame] of samples [first, stop) in tar order of the shard at
    `path` holding `count`, for `task` = (path, count, first, stop, frame): a process pool's task."""
    path, count, first, stop, frame = task
    samples = read_shard(path, count)[first:stop]
    frames = np.empty((len(samples), 3, frame, frame), dtype=np.uint8)
    for index, (key, jpeg) in enumerate(samples):
        image = open_frame(key, jpeg, path)
        if image.size != (frame, frame):
            raise LoaderError(f"{path}: sample {key} is {image.size[0]}x{image.size[1]}, the pack's frames are "
                              f"{frame}x{frame}; re-pack the dataset (python -m hybridgan.pack)")
        frames[index] = np.asarray(image).transpose(2, 0, 1)
    return [key for key, _ in samples], frames


def check_device_memory(needed: int, device: torch.device, what: str) -> None:
    """Refuse (one LoaderError line naming the sizes) when a CUDA device cannot hold `needed` bytes
    and keep DEVICE_MARGIN of its memory free for training."""
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    if needed > free - DEVICE_MARGIN * total:
        raise LoaderError(f"data.resident: {what} take {needed / 1e9:.2f} GB but {device} has {free / 1e9:.2f} GB "
                          f"free of {total / 1e9:.2f} GB, and {DEVICE_MARGIN:.0%} of it must stay free for "
                          f"training; set data.resident=false")


def decode_split(layout: SplitLayout, frame: int, device: torch.device, workers: int,
                 progress: bool) -> tuple[list[str], torch.Tensor]:
    """Every sample of the split in sample-id order (see SplitLayout.offsets): its keys, and its
    frames as one uint8 tensor [N, 3, frame, frame] on `device`, decoded by `workers` processes
    (0: in this one). A task decodes a shard, or a part of one when there are fewer than two shards per
    worker (each part reads the whole tar, which costs about as much as decoding 200 of its faces)."""
    frames = torch.empty((sum(layout.counts), 3, frame, frame), dtype=torch.uint8, device=device)
    keys: list[str] = []
    parts = max(1, math.ceil(2 * workers / max(1, len(layout.paths))))
    tasks = []
    for path, count in zip(layout.paths, layout.counts):
        step = max(1, math.ceil(count / parts))
        tasks += [(path, count, first, min(first + step, count), frame) for first in range(0, count, step)]
    pool = ProcessPoolExecutor(workers) if workers else None
    try:
        decoded = pool.map(_decode_samples, tasks) if pool else map(_decode_samples, tasks)
        with tqdm(total=frames.shape[0], unit="img", desc="decode train split", disable=not progress) as bar:
            for chunk_keys, chunk_frames in decoded:
                frames[len(keys):len(keys) + len(chunk_keys)] = torch.from_numpy(chunk_frames)
                keys += chunk_keys
                bar.update(len(chunk_keys))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return keys, frames


class ResidentLoader:
    """One rank's training loader holding the whole split on `device` (see the module docstring):
    `loader(epoch, start=0)` yields that epoch's batches from batch `start` on, as SplitLoader does:
    `{"image": uint8 [b, 3, S, S] on device, "key": [str]}`."""

    def __init__(self, cfg: Config, split: str, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", workers: int | None = None) -> None:
        device = torch.device(device)
        layout = SplitLayout.read(cfg, split)
        self.planner = EpochPlanner.of(cfg, layout, train=True, batch_size=batch_size, rank=rank,
                                       world_size=world_size)
        self.planner.plan(0)  # a bad batch size fails here, before any decoding
        self.opts = sample_options(cfg, train=True)
        self.frame = int(read_manifest(cfg.data.shards)["image_size"])
        count = sum(layout.counts)
        needed = count * 3 * self.frame * self.frame
        what = f"the {split} split's {count:,} frames of 3x{self.frame}x{self.frame} uint8"
        check_device_memory(needed, device, what)
        workers = cfg.data.workers if workers is None else workers
        if rank == 0:
            print(f"data.resident: {what} take {needed / 1e9:.2f} GB of {device} memory on every rank; "
                  f"decoding them with {workers or 'no'} worker processes")
        self.keys, self.frames = decode_split(layout, self.frame, device, workers, progress=rank == 0)
        self.crops = PillowBilinear(self.frame, cfg.data.crop_fraction, cfg.data.image_size, device)

    def __len__(self) -> int:
        """This rank's batches per epoch (of epoch 0; the same every epoch unless data.resampled)."""
        return self.planner.plan(0)[1].batches

    def __call__(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        sequence, plan = self.planner.plan(epoch)
        for positions in plan.positions(range(start, plan.batches)):
            yield self.batch(sequence[positions], epoch)

    def batch(self, ids: np.ndarray, epoch: int) -> dict[str, Any]:
        """The batch of samples `ids` in `epoch`: their frames cropped, resized and flipped on the device."""
        keys = [self.keys[i] for i in ids.tolist()]
        crops = [augmentation(self.opts, epoch, key, self.frame)[:2] for key in keys]
        draws = np.array([ids, [box[0] for box, _ in crops], [box[1] for box, _ in crops],
                          [flip for _, flip in crops]], dtype=np.int64)
        index, left, top, flip = torch.from_numpy(draws).to(self.frames.device, non_blocking=True)
        return {"image": self.crops(self.frames[index], left, top, flip.bool()), "key": keys}
