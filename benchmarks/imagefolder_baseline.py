"""Plain torchvision `ImageFolder` + `DataLoader` images/s, the yardstick for `bench loader`.

The same transform as the loader's training path at the paper's size (random 240x240 crop of the
256 frame, resize to 128, flip, uint8 tensors), on a folder of the same JPEGs (one subfolder, as
ImageFolder wants), so that the two figures can be read side by side in one session:

    python benchmarks/imagefolder_baseline.py FOLDER --workers 0,1,2 [--batches 100]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms


def images_per_second(folder: str, workers: int, batches: int, batch_size: int) -> float:
    """Images/s over `batches` batches after the first (which pays for starting the workers)."""
    transform = transforms.Compose([transforms.RandomCrop(240), transforms.Resize(128),
                                    transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    loader = DataLoader(datasets.ImageFolder(folder, transform), batch_size=batch_size, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    done, started = 0, None
    while done < batches:
        for _ in loader:
            if started is None:
                started = time.perf_counter()
                continue
            done += 1
            if done == batches:
                break
    return batches * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder holding one subfolder of JPEGs")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for workers in (int(w) for w in args.workers.split(",")):
        rate = images_per_second(args.folder, workers, args.batches, args.batch_size)
        print(f"torchvision ImageFolder workers={workers}: {rate:.1f} img/s")


if __name__ == "__main__":
    main()
