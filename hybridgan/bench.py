"""Throughput benchmarks, one subcommand each.

    python -m hybridgan.bench loader --shards shards/NAME [--workers 1,2] [--batches N] [--json PATH]

`loader`: train-split images/s of `make_loader` at `data.image_size` for each worker count (the
first batch, which pays for worker start-up, is timed apart), then images/s of `hybridgan.pack`
on `synthetic:N` into a temporary folder (synthetic drawing, JPEG encoding and tar writing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from itertools import count
from pathlib import Path
from typing import Any, Callable

from hybridgan.config import Config, add_config_arguments, config_from_args


def _worker_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers {text!r}: expected e.g. 1,2") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"--workers {text!r}: expected non-negative integers")
    return values


def time_loader(cfg: Config, workers: int, batches: int, batch_size: int) -> dict[str, Any]:
    """Read `batches` train batches (over as many epochs as needed); timings and images/s."""
    from hybridgan.data.loader import make_loader

    start = time.perf_counter()
    first = None
    seen = images = 0
    for epoch in count():
        for batch in make_loader(cfg, "train", batch_size=batch_size, epoch=epoch, workers=workers):
            if first is None:
                first = time.perf_counter()
            else:
                images += len(batch["key"])
            seen += 1
            if seen == batches + 1:
                steady = time.perf_counter() - first
                return {"workers": workers, "images": images, "seconds": round(steady, 3),
                        "images_per_s": round(images / steady, 1),
                        "first_batch_s": round(first - start, 3)}
    raise AssertionError("unreachable")


def time_pack(cfg: Config, workers: int, images: int) -> dict[str, Any]:
    """Pack synthetic:`images` into a temporary folder with `workers` processes; images/s."""
    from hybridgan.pack import pack

    pack_cfg = replace(cfg.pack, shard_size=max(1, images // max(4, 2 * workers)))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        pack(f"synthetic:{images}", Path(tmp) / "bench", pack_cfg, workers=workers)
        seconds = time.perf_counter() - start
    return {"workers": workers, "images": images, "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 1)}


def _table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = [title, "  ".join(f"{c:>14}" for c in columns)]
    lines += ["  ".join(f"{row[c]:>14}" for c in columns) for row in rows]
    return "\n".join(lines)


def run_loader(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.shards:
        cfg.data.shards = args.shards
    batch_size = args.batch_size or cfg.train.batch_size
    loader_rows = [time_loader(cfg, w, args.batches, batch_size) for w in args.workers]
    for row in loader_rows:
        row["images_per_s_per_worker"] = round(row["images_per_s"] / max(1, row["workers"]), 1)
    print(_table(f"train loader: {cfg.data.shards}, {cfg.data.image_size}x{cfg.data.image_size}, "
                 f"batch {batch_size}, {args.batches} batches, {os.cpu_count()} CPUs",
                 loader_rows, ["workers", "images_per_s", "images_per_s_per_worker", "first_batch_s"]))
    pack_rows = [time_pack(cfg, w, args.pack_images) for w in args.workers] if args.pack_images else []
    if pack_rows:
        print(_table(f"pack: synthetic:{args.pack_images} at {cfg.pack.source_size}x{cfg.pack.source_size}",
                     pack_rows, ["workers", "images_per_s", "seconds"]))
    if args.json:
        result = {"image_size": cfg.data.image_size, "batch_size": batch_size, "cpus": os.cpu_count(),
                  "shards": cfg.data.shards, "loader": loader_rows, "pack": pack_rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _add_loader(subparsers: Any) -> None:
    parser = subparsers.add_parser("loader", help="train loader and pack images/s")
    parser.add_argument("--shards", default=None, help="packed dataset (default data.shards)")
    parser.add_argument("--workers", type=_worker_list, default=[1, 2], help="worker counts, e.g. 1,2")
    parser.add_argument("--batches", type=int, default=50, help="timed batches per worker count")
    parser.add_argument("--batch-size", type=int, default=0, help="default train.batch_size")
    parser.add_argument("--pack-images", type=int, default=200, help="synthetic images to pack (0: skip)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    add_config_arguments(parser)
    parser.set_defaults(func=run_loader)


SUBCOMMANDS: list[Callable[[Any], None]] = [_add_loader]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridgan.bench", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
