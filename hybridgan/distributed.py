"""Work across ranks: the one way validation, the held-out pass and evaluation average over processes,
and the one way a multi-process command ends."""

from __future__ import annotations

from typing import Mapping

import torch
from accelerate import Accelerator


def mean_over_ranks(accelerator: Accelerator, sums: Mapping[str, torch.Tensor | float],
                    count: torch.Tensor | float) -> tuple[dict[str, float], int]:
    """(each quantity's mean over every image of every rank, the number of those images).

    `sums` holds this rank's sum of each quantity over its own `count` images (a per-image value
    summed, or a batch mean times the batch's size). The sums and the counts of all ranks are added
    in one all-reduce, in float64, and divided: each rank weighs by its number of images, so an
    uneven last batch, or a rank that saw none, gives the exact mean over all images, whatever the
    world size. NaN when no rank saw an image. Every rank must call it, with the same names.
    """
    names = sorted(sums)

    def scalar(value: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(value, dtype=torch.float64, device=accelerator.device).reshape(())

    totals = accelerator.reduce(torch.stack([scalar(sums[name]) for name in names] + [scalar(count)]),
                                reduction="sum").cpu()
    images = float(totals[-1])
    means = {name: float(totals[i]) / images if images else float("nan") for i, name in enumerate(names)}
    return means, int(images)


def end_process_group() -> None:
    """Destroy the default process group, if this process has one: the last thing a command that may
    run under a multi-process launch does when it succeeds, on every rank, after its last collective.

    Left to the interpreter's exit, gloo's threads can still hold work when the process tears down,
    and a rank that has finished all its work dies with "terminate called without an active
    exception" (SIGABRT), which fails the whole launch: 1 of 40 2-rank evaluations run in a loop on
    a busy 2-core machine did, none of 70 with this call. A failed command does not call it: another
    rank may still be inside a collective, and destroying the group then can hang instead of exiting."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
