"""`loader`: train-split images/s of the worker loader (and of `data.resident`) per worker count,
then images/s of `hybridgan.pack`."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from itertools import count
from pathlib import Path
from typing import Any

import torch

from hybridgan.bench.measure import table
from hybridgan.config import Config, add_config_arguments, config_from_args


def _worker_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers {text!r}: expected e.g. 1,2") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"--workers {text!r}: expected non-negative integers")
    return values


def time_loader(cfg: Config, workers: int, batches: int, batch_size: int, resident: bool = False) -> dict[str, Any]:
    """Read `batches` train batches (over as many epochs as needed); timings and images/s. `resident`:
    the split decoded once (by `workers` processes, in the first batch's time) into the memory of the
    GPU if there is one, else the host, and batches made there (data.resident)."""
    from hybridgan.data.loader import SplitLoader
    from hybridgan.data.resident import ResidentLoader

    start = time.perf_counter()
    first = None
    seen = images = 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = (ResidentLoader(cfg, "train", batch_size=batch_size, workers=workers, device=device) if resident
              else SplitLoader(cfg, "train", batch_size=batch_size, workers=workers))
    for epoch in count():
        for batch in loader(epoch):
            if batch["image"].is_cuda:
                torch.cuda.synchronize()
            if first is None:
                first = time.perf_counter()
            else:
                images += len(batch["key"])
            seen += 1
            if seen == batches + 1:
                steady = time.perf_counter() - first
                return {"workers": workers, **({"device": str(device)} if resident else {}),
                        "images": images, "seconds": round(steady, 3),
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


def run_loader(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.shards:
        cfg.data.shards = args.shards
    batch_size = args.batch_size or cfg.train.batch_size
    loader_rows = [time_loader(cfg, w, args.batches, batch_size) for w in args.workers]
    for row in loader_rows:
        row["images_per_s_per_worker"] = round(row["images_per_s"] / max(1, row["workers"]), 1)
    print(table(f"train loader: {cfg.data.shards}, {cfg.data.image_size}x{cfg.data.image_size}, "
                 f"batch {batch_size}, {args.batches} batches, {os.cpu_count()} CPUs",
                 loader_rows, ["workers", "images_per_s", "images_per_s_per_worker", "first_batch_s"]))
    resident_rows = ([time_loader(cfg, max(args.workers), args.batches, batch_size, resident=True)]
                     if args.resident else [])
    if resident_rows:
        print(table(f"resident train split (data.resident): batches made on {resident_rows[0]['device']}; "
                     f"first_batch_s includes decoding the split with `workers` processes",
                     resident_rows, ["workers", "device", "images_per_s", "first_batch_s"]))
    pack_rows = [time_pack(cfg, w, args.pack_images) for w in args.workers] if args.pack_images else []
    if pack_rows:
        print(table(f"pack: synthetic:{args.pack_images} at {cfg.pack.source_size}x{cfg.pack.source_size}",
                     pack_rows, ["workers", "images_per_s", "seconds"]))
    if args.json:
        result = {"image_size": cfg.data.image_size, "batch_size": batch_size, "cpus": os.cpu_count(),
                  "shards": cfg.data.shards, "loader": loader_rows, "resident": resident_rows, "pack": pack_rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("loader", help="train loader and pack images/s")
    parser.add_argument("--shards", default=None, help="packed dataset (default data.shards)")
    parser.add_argument("--workers", type=_worker_list, default=[1, 2], help="worker counts, e.g. 1,2")
    parser.add_argument("--batches", type=int, default=50, help="timed batches per worker count")
    parser.add_argument("--batch-size", type=int, default=0, help="default train.batch_size")
    parser.add_argument("--pack-images", type=int, default=200, help="synthetic images to pack (0: skip)")
    parser.add_argument("--resident", action="store_true",
                        help="also time data.resident batches (the split decoded once into device memory)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    add_config_arguments(parser)
    parser.set_defaults(func=run_loader)
