"""The paper's tables and figures, read back from run folders (used by evaluate and reproduce).

- `table1(pretrain_dir)`: Table 1, the pre-trained discriminator's held-out loss per epoch, from
  the `metrics.jsonl` records with `"split": "test"` (`test_loss`, `test_accuracy`; the last record
  of each epoch wins).
- `table2(hybrid_dir, pathak_dir)`: Table 2, `gen_adv_loss`, `gen_pixel_loss`, `disc_loss` of the
  last three epochs both runs logged (`"split": "epoch"` records), the hybrid's generator losses with
  their relative change against Pathak's as the paper prints them: `0.322 (-68%)`.
- `image_grid`, `loss_curves_png`: the PNG figures (PIL for image grids, matplotlib Agg for curves).
- `paired_differences`, `sharper_at_equal_psnr`: the paper's claim decided on per-face values: the
  mean paired difference (hybrid - Pathak) of every hole metric with a seeded bootstrap 95 % interval,
  and the one-sentence verdict of the rule in `sharper_at_equal_psnr`.
- `hf_gap`, `sharper_than`: the rule that compares any two generators (a discriminator against none,
  the hybrid against Pathak's): is one fill's high-frequency energy closer to the original's, without
  artefacts, and at what PSNR cost.

Numbers are printed with three significant digits (`0.0013`, `0.322`, `12.5`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
import torch
from torch import Tensor

from hybridgan.tracking import read_records

LOSS_KEYS = ("gen_adv_loss", "gen_pixel_loss", "disc_loss")
BOOTSTRAP_ROUNDS = 10_000
EQUAL_PSNR_DB = 0.5  # two fills have "equal PSNR" when the 95 % interval of the difference lies within +-this
SEAM_TOLERANCE = 1.5  # a fill's seam (edge_jump) may be at most this many times the original's edge contrast
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
    """Table 1: epoch | test loss | test accuracy of the pre-trained discriminator, and, where the
    records hold them (hybridgan.blur_metrics), accuracy on originals and per blur variance, D's and
    the classical detector's accuracy on the second half, per-pixel AUROC and the prior's."""
    records = epoch_records(pretrain_dir, "test")
    first = next(iter(records.values()), {})
    buckets = [key for key in first if key.startswith("accuracy_variance_")]
    extra = [key for key in ("accuracy_originals", *buckets, "accuracy_second_half", "classical_accuracy",
                             "pixel_auroc", "prior_auroc") if key in first]
    rows = []
    for epoch, record in records.items():
        loss = _metric(record, "test_loss", pretrain_dir)
        accuracy = _metric(record, "test_accuracy", pretrain_dir)
        cells = [f"{record[key]:.3f}" if key.endswith("auroc") else f"{record[key] * 100:.1f}%"
                 if isinstance(record.get(key), (int, float)) and math.isfinite(record[key]) else "-" for key in extra]
        rows.append([epoch, fmt(loss), f"{accuracy * 100:.1f}%", *cells])
    names = {"accuracy_originals": "originals", "accuracy_second_half": "D, 2nd half",
             "classical_accuracy": "classical, 2nd half", "pixel_auroc": "pixel AUROC", "prior_auroc": "prior AUROC"}
    headers = ["epoch", "test loss", "test accuracy",
               *(names.get(key, key.replace("accuracy_variance_", "variance ")) for key in extra)]
    return markdown_table(headers, rows)


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


def bootstrap_interval(differences: Sequence[float], seed: int, rounds: int = BOOTSTRAP_ROUNDS,
                       level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its percentile bootstrap interval: (mean, low, high).

    Faces are resampled with replacement `rounds` times (numpy, seeded), the mean taken each time;
    the interval is the central `level` of those means.
    """
    values = np.asarray(differences, dtype=np.float64)
    if values.size == 0:
        raise ReportError("no paired faces to compare")
    draws = np.random.default_rng(seed).integers(0, values.size, size=(rounds, values.size))
    means = values[draws].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)


def paired_differences(first: dict[str, Sequence[float]], second: dict[str, Sequence[float]],
                       seed: int) -> dict[str, dict[str, float]]:
    """Per metric, `first - second` face by face: {"mean", "low", "high", "n"} (95 % bootstrap)."""
    out = {}
    for name in first:
        a, b = np.asarray(first[name], dtype=np.float64), np.asarray(second[name], dtype=np.float64)
        if a.shape != b.shape:
            raise ReportError(f"metric {name}: {a.size} faces against {b.size}; the comparison needs the same faces")
        mean, low, high = bootstrap_interval(a - b, seed)
        out[name] = {"mean": mean, "low": low, "high": high, "n": int(a.size)}
    return out


def _interval(diff: dict[str, float], unit: str = "") -> str:
    return f"{diff['mean']:+.3g}{unit} [{diff['low']:+.3g}, {diff['high']:+.3g}]"


def sharper_at_equal_psnr(diffs: dict[str, dict[str, float]], first: str = "hybrid", second: str = "Pathak") -> str:
    """One sentence: is `first` sharper than `second` at equal PSNR?

    The rule: PSNR is equal when the 95 % interval of the PSNR difference lies within
    +-EQUAL_PSNR_DB; `first` is sharper when the interval of the `detail` difference (recovered
    fine detail, which noise and checkerboards cannot raise) lies above 0, blurrier when below 0,
    and neither can be said when it contains 0.
    """
    psnr, detail = diffs["psnr"], diffs["detail"]
    figures = f"(detail {_interval(detail)}, PSNR {_interval(psnr, ' dB')}, {detail['n']} faces, 95 % bootstrap)"
    equal = -EQUAL_PSNR_DB <= psnr["low"] and psnr["high"] <= EQUAL_PSNR_DB
    if detail["low"] > 0:
        verdict = "sharper"
    elif detail["high"] < 0:
        verdict = "blurrier"
    else:
        verdict = "neither sharper nor blurrier"
    if equal:
        return f"At equal PSNR (within +-{EQUAL_PSNR_DB} dB) the {first} fill is {verdict} than the {second} fill {figures}."
    return (f"The PSNRs are not equal (the interval leaves +-{EQUAL_PSNR_DB} dB), so the claim is not decided at "
            f"equal PSNR; the {first} fill is {verdict} than the {second} fill {figures}.")


def differences_markdown(diffs: dict[str, dict[str, float]], first: str, second: str) -> str:
    """The paired differences as a table: metric | mean difference | 95 % interval."""
    rows = [[name, f"{d['mean']:+.4g}", f"[{d['low']:+.4g}, {d['high']:+.4g}]"] for name, d in diffs.items()]
    return markdown_table(["metric", f"{first} - {second}", "95 % bootstrap interval"], rows)


def hf_gap(sharpness: Sequence[float]) -> list[float]:
    """Per face, how far the fill's high-frequency energy is from the original's: |ln sharpness|
    (0 when equal; a fill with half or twice the energy scores the same ln 2)."""
    return [abs(float(np.log(max(value, 1e-12)))) for value in sharpness]


def sharper_than(diffs: dict[str, dict[str, float]], first_means: dict[str, float], first: str,
                 second: str) -> tuple[str, str]:
    """Is `first`'s fill sharper than `second`'s? (outcome, one sentence with the figures).

    The rule: `first` is sharper when the 95 % interval of the paired `hf_gap` difference lies below
    0 (its high-frequency energy is closer to the original's) and its fill adds no artefact: a mean
    checkerboard no higher than the original's and a mean seam within SEAM_TOLERANCE times the
    original's edge contrast; blurrier when the interval lies above 0; no different when it holds 0.
    The PSNR difference is the cost stated beside; `detail` (in-place detail) is reported but does
    not decide: a GAN's texture is rarely where the original's was, so it reads as no detail.
    """
    gap, psnr, detail = diffs["hf_gap"], diffs["psnr"], diffs["detail"]
    figures = (f"high-frequency gap {_interval(gap)}, PSNR {_interval(psnr, ' dB')}, in-place detail "
               f"{_interval(detail)}; {gap['n']} faces, 95 % bootstrap")
    artefacts = []
    if first_means["checkerboard"] > first_means["checkerboard_ref"]:
        artefacts.append(f"checkerboard {first_means['checkerboard']:.2f} above the original's "
                         f"{first_means['checkerboard_ref']:.2f}")
    if first_means["edge_jump"] > SEAM_TOLERANCE * first_means["edge_jump_ref"]:
        artefacts.append(f"seam {first_means['edge_jump']:.1f} over {SEAM_TOLERANCE}x the original's "
                         f"{first_means['edge_jump_ref']:.1f}")
    if gap["high"] < 0 and not artefacts:
        return "sharper", f"The {first} fill is sharper than the {second} fill ({figures})."
    if gap["high"] < 0:
        return ("sharper with artefacts", f"The {first} fill has more high-frequency energy than the {second} "
                f"fill, but with artefacts ({'; '.join(artefacts)}), so it is not called sharper ({figures}).")
    if gap["low"] > 0:
        return "blurrier", f"The {first} fill is blurrier than the {second} fill ({figures})."
    return "no different", f"The {first} fill is no sharper and no blurrier than the {second} fill ({figures})."
