"""The paper's tables and figures, read back from run folders (used by evaluate and reproduce).

- `table1(pretrain_dir)`: Table 1, the pre-trained discriminator's held-out loss per epoch, from
  the `metrics.jsonl` records with `"split": "test"` (`test_loss`, `test_accuracy`; the last record
  of each epoch wins).
- `table2(hybrid_dir, pathak_dir)`: Table 2, `gen_adv_loss`, `gen_pixel_loss`, `disc_loss` of the
  last three epochs both runs logged (`"split": "epoch"` records), the hybrid's generator losses with
  their relative change against Pathak's as the paper prints them: `0.322 (-68%)`.
- `image_grid`, `loss_curves_png`: the PNG figures (PIL for image grids, matplotlib Agg for curves).

Numbers are printed with three significant digits (`0.0013`, `0.322`, `12.5`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
import torch
from torch import Tensor

from hybridgan.tracking import read_records

LOSS_KEYS = ("gen_adv_loss", "gen_pixel_loss", "disc_loss")
LABEL_HEIGHT = 14


class ReportError(ValueError):
    """A missing or unreadable metrics log, or one without the records a table needs."""


def read_metrics(stage_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `stage_dir/metrics.jsonl` in order (see `tracking.read_records`)."""
    path = Path(stage_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path}: metrics log not found")
    try:
        return read_records(path)
    except ValueError as err:
        raise ReportError(str(err)) from None


def epoch_records(stage_dir: str | Path, split: str) -> dict[int, dict[str, Any]]:
    """The last record of each epoch with the given split, keyed by epoch, in epoch order."""
    by_epoch = {}
    for record in read_metrics(stage_dir):
        if record.get("split") == split and "epoch" in record:
            by_epoch[int(record["epoch"])] = record
    if not by_epoch:
        raise ReportError(f"{Path(stage_dir) / 'metrics.jsonl'}: no records with split {split!r}")
    return dict(sorted(by_epoch.items()))


def fmt(value: float) -> str:
    """Three significant digits, as the paper's tables."""
    return f"{value:.3g}"


def relative(value: float, reference: float) -> str:
    """`value` with its change against `reference` in percent: `0.322 (-68%)`."""
    if reference == 0:
        return fmt(value)
    return f"{fmt(value)} ({(value - reference) / abs(reference) * 100:+.0f}%)"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells are converted with str()."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _metric(record: dict[str, Any], key: str, stage_dir: str | Path) -> float:
    if key not in record:
        raise ReportError(f"{Path(stage_dir) / 'metrics.jsonl'}: epoch {record['epoch']} has no {key!r}")
    return float(record[key])


def table1(pretrain_dir: str | Path) -> str:
    """Table 1: epoch | test loss | test accuracy of the pre-trained discriminator."""
    rows = []
    for epoch, record in epoch_records(pretrain_dir, "test").items():
        loss = _metric(record, "test_loss", pretrain_dir)
        accuracy = _metric(record, "test_accuracy", pretrain_dir)
        rows.append([epoch, fmt(loss), f"{accuracy * 100:.1f}%"])
    return markdown_table(["epoch", "test loss", "test accuracy"], rows)


def table2(hybrid_dir: str | Path, pathak_dir: str | Path, last: int = 3) -> str:
    """Table 2: the last `last` epochs both runs logged, Pathak's losses then the hybrid's."""
    hybrid, pathak = epoch_records(hybrid_dir, "epoch"), epoch_records(pathak_dir, "epoch")
    common = sorted(set(hybrid) & set(pathak))[-last:]
    if not common:
        raise ReportError(f"{hybrid_dir} and {pathak_dir}: no epoch logged by both runs")
    headers = ["epoch"] + [f"Pathak {key}" for key in LOSS_KEYS] + [f"hybrid {key}" for key in LOSS_KEYS]
    rows = []
    for epoch in common:
        ref = [_metric(pathak[epoch], key, pathak_dir) for key in LOSS_KEYS]
        ours = [_metric(hybrid[epoch], key, hybrid_dir) for key in LOSS_KEYS]
        rows.append([epoch, *map(fmt, ref), relative(ours[0], ref[0]), relative(ours[1], ref[1]), fmt(ours[2])])
    return markdown_table(headers, rows)


def to_uint8(image: Tensor) -> np.ndarray:
    """A [3, H, W] image in [-1, 1] as an H x W x 3 uint8 array."""
    unit = ((image.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return unit.to(torch.uint8).permute(1, 2, 0).numpy()


def image_grid(cells: Sequence[Sequence[np.ndarray]], labels: Sequence[str] = (), pad: int = 2) -> Image.Image:
    """Rows of equally sized H x W x 3 uint8 cells on white, with column labels on top if given.

    Size: width = cols * W + (cols + 1) * pad, height = LABEL_HEIGHT (if labels) + rows * H + (rows + 1) * pad.
    """
    height, width = cells[0][0].shape[:2]
    cols = max(len(row) for row in cells)
    top = LABEL_HEIGHT if labels else 0
    canvas = Image.new("RGB", (cols * width + (cols + 1) * pad, top + len(cells) * height + (len(cells) + 1) * pad),
                       "white")
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            canvas.paste(Image.fromarray(cell), (pad + c * (width + pad), top + pad + r * (height + pad)))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for c, label in enumerate(labels):
        text = label
        while text and draw.textlength(text, font=font) > width:
            text = text[:-1]
        draw.text((pad + c * (width + pad), 1), text, fill="black", font=font)
    return canvas


def loss_curves_png(series: dict[str, list[dict[str, Any]]], path: str | Path, keys: Sequence[str] = LOSS_KEYS) -> Path:
    """One panel per loss key, one line per run (label -> "split": "epoch" records), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for axis, key in zip(axes[0], keys):
        for label, records in series.items():
            points = [(r["epoch"], r[key]) for r in records if key in r and "epoch" in r]
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
        axis.set_title(key)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
        else:
            axis.text(0.5, 0.5, "no epoch records", ha="center", va="center", transform=axis.transAxes)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
