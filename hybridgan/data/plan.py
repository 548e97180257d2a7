"""The epoch plan every loader of a split shares (the worker loader and the resident one): the
split's shards (`SplitLayout`), an epoch's global sample sequence (`epoch_sequence`), and which
positions of it each rank reads, batch by batch (`BatchPlan`, `EpochPlanner`). Pure functions of the
manifest, run.seed and the epoch; hybridgan/data/loader.py's docstring states the contract.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hybridgan.config import Config
from hybridgan.data.manifest import shard_entries


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
