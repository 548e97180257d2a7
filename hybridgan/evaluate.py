"""Compare trained generators on the test split: hole metrics, the paper's Figure 2 and Table 2 curves.

    python -m hybridgan.evaluate runs/paper/train-hybrid runs/paper/train-pathak [--out DIR]
        [--split test] [--batch-size N] [--max-batches N] [--shards DIR | --photos DIR] [--cpu]

Each RUN is a train stage folder holding `generator.safetensors`, or an export file itself. The
data (`data.shards`, `data.image_size`) and the holes (`mask`, seeded with `run.seed`) come from
the first RUN's config (`--shards` overrides the folder); every RUN must share its image size.
`--photos DIR` evaluates a folder of photos instead (any size; the files `inpaint` takes from a
folder, sorted by name): each is read as `pack` reads a source (8-bit RGB, EXIF orientation, the
centred square of side min(W, H) resized to `pack.source_size`), then seen as the test split is
(the centred `data.crop_fraction` crop resized to `data.image_size`).
One pass over the split feeds every generator and two baselines the same images and masks: the
mean-colour fill and OpenCV's classical Telea inpainting (`cv2.inpaint`, radius 3, on the 8-bit face). Every rank reads the whole split and handles every world_size-th batch (so the masks
and the numbers do not depend on the number of processes); per-image values are gathered with
`gather_for_metrics` and the main process writes, into `--out` (default: `runs/<name>/eval/`
next to the first RUN's stage folder):

- `eval.json`: per row (each RUN, then the baseline) name, path, discriminator kind, metrics, n;
  and, when the RUNs include a hybrid-D and a Pathak-D generator (the first of each), `comparison`:
  the paired difference (hybrid - Pathak) of every metric over the same faces with a seeded
  bootstrap 95 % interval, and `verdict`, one sentence on whether the hybrid is sharper at equal
  PSNR (`report.sharper_at_equal_psnr` states the rule);
- `eval.md`: the same as Markdown tables and the verdict;
- `figure.png` (the paper's Figure 2): per test face a row original | masked | RUN 1 | RUN 2 | ... |
  OpenCV Telea, each cell the face above a zoomed crop of its hole (the eyes and nose of an aligned
  face under the centre hole, with a margin so seams show) above that fill's hole metrics (the
  original's cell: its own edge jump and checkerboard), `eval.figure_rows` faces from the first
  batches (none and no figure when 0);
- `losses.png`: gen_adv_loss, gen_pixel_loss, disc_loss per epoch from each RUN's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from hybridgan.atomic import write_text_atomic
from hybridgan.config import Config, at_least, cli_parser, out_folder
from hybridgan.data.loader import batches_per_epoch, make_loader, to_device
from hybridgan.data.manifest import ManifestError, shard_urls
from hybridgan.data.masks import apply_mask, make_masks
from hybridgan.data.photo import PhotoError, open_photo, square_frame
from hybridgan.data.preprocess import eval_face
from hybridgan.inpaint import InpaintError, expand_photos, load_generator, resolve_export
from hybridgan.metrics import METRICS, PSNR_CEILING, hole_box, hole_metrics, mean_fill
from hybridgan.models import ContextEncoder
from hybridgan.report import (
    ReportError, differences_markdown, image_grid, loss_curves_png, markdown_table, paired_differences,
    read_metrics, sharper_at_equal_psnr, to_uint8,
)

BASELINE = "mean-colour fill"
TELEA = "OpenCV Telea"
BASELINES = (BASELINE, TELEA)
TELEA_RADIUS = 3
FIGURE_CELL = 128  # faces are scaled up (nearest) to at least this many pixels a side in figure.png
CAPTION_LINES = 3
LINE_HEIGHT = 12


class EvalError(ValueError):
    """A RUN without a generator, missing shards, mismatched runs; the message names the path."""


@dataclass
class Run:
    """One generator under evaluation."""

    name: str
    path: Path
    stage_dir: Path
    model: ContextEncoder
    cfg: Config


def load_runs(sources: list[str], device: torch.device) -> list[Run]:
    """Every RUN's generator and config, named by stage folder (`run/stage` when names collide)."""
    runs = []
    for source in sources:
        try:
            path = resolve_export(source)
            model, cfg = load_generator(path, device)
        except InpaintError as err:
            raise EvalError(str(err)) from None
        runs.append(Run("", path, path.parent, model, cfg))
    for run in runs:
        run.name = run.stage_dir.name if run.path.name == "generator.safetensors" else run.path.stem
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.stage_dir.parent.name}/{run.name}"
    first = runs[0].cfg.data.image_size
    for run in runs[1:]:
        if run.cfg.data.image_size != first:
            raise EvalError(f"{run.path}: data.image_size={run.cfg.data.image_size} differs from "
                            f"{runs[0].path}'s {first}")
    mask = runs[0].cfg.mask
    for run in runs:
        centre_only = run.model.output_size != run.model.image_size
        if centre_only and (mask.kind != "center" or mask.hole_size != run.model.hole_size):
            raise EvalError(f"{run.path}: fills only a central {run.model.hole_size}x{run.model.hole_size} hole, "
                            f"but the evaluation uses mask.kind={mask.kind}, mask.hole_size={mask.hole_size} "
                            f"(from {runs[0].path})")
    return runs


def check_shards(cfg: Config, split: str) -> None:
    try:
        shard_urls(cfg.data.shards, split)
    except ManifestError as err:
        raise EvalError(str(err)) from None


Row = tuple[str, int, dict[str, float]]  # name, face index in the split, metrics


def telea_fill(masked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """OpenCV's Telea inpainting of each [3, S, S] face's hole (8-bit), the known pixels kept exactly."""
    import cv2

    filled = []
    for image, hole in zip(masked, mask):
        pixels = to_uint8(image)
        holes = (hole[0].detach().cpu().numpy() > 0.5).astype(np.uint8)
        result = cv2.inpaint(np.ascontiguousarray(pixels), holes, TELEA_RADIUS, cv2.INPAINT_TELEA)
        filled.append(torch.from_numpy(result).permute(2, 0, 1).float().div(127.5).sub(1.0))
    fill = torch.stack(filled).to(masked.device)
    return masked * (1 - mask) + fill * mask


def photo_files(folder: Path) -> list[Path]:
    """The photos of a folder, sorted; EvalError naming it when there are none."""
    if not folder.is_dir():
        raise EvalError(f"{folder}: photo folder not found")
    files = expand_photos([folder])
    if not files:
        raise EvalError(f"{folder}: no photos (files ending in .jpg, .jpeg, .png, ...)")
    return files


def photo_batches(files: list[Path], cfg: Config, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches {"image": [B, 3, S, S] in [-1, 1]} of photo files, in the test split's view of a face."""
    for start in range(0, len(files), batch_size):
        faces = []
        for path in files[start:start + batch_size]:
            try:
                frame = square_frame(open_photo(path.read_bytes(), str(path)), cfg.pack.source_size)
            except PhotoError as err:
                raise EvalError(str(err)) from None
            pixels = eval_face(frame, cfg.data.image_size, cfg.data.crop_fraction)
            faces.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0))
        yield {"image": torch.stack(faces)}


class Collector:
    """Per-image metric rows of this rank, and the first faces of the figure (main process)."""

    def __init__(self, names: list[str], figure_rows: int) -> None:
        self.names, self.figure_rows = names, figure_rows
        self.rows: list[Row] = []
        self.figure: list[dict[str, torch.Tensor]] = []

    def add(self, name: str, first_face: int, filled: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> None:
        values = hole_metrics(filled, real, mask)
        for i in range(real.shape[0]):
            self.rows.append((name, first_face + i, {metric: float(values[metric][i]) for metric in METRICS}))

    def keep_for_figure(self, real: torch.Tensor, mask: torch.Tensor, fills: dict[str, torch.Tensor]) -> None:
        for i in range(min(real.shape[0], self.figure_rows - len(self.figure))):
            face = {"masked": apply_mask(real[i], mask[i]), "original": real[i], "mask": mask[i]}
            face.update({name: fills[name][i] for name in [*self.names, TELEA]})
            self.figure.append({key: value.detach().cpu() for key, value in face.items()})


@torch.no_grad()
def collect(runs: list[Run], cfg: Config, split: str, batch_size: int, max_batches: int,
            accelerator: Accelerator, photos: list[Path] | None = None) -> Collector:
    """One pass over the split (or the photo files): every run and the baseline on the same images and masks."""
    names = [run.name for run in runs]
    collector = Collector(names, cfg.eval.figure_rows if accelerator.is_main_process else 0)
    masks_rng = torch.Generator().manual_seed(cfg.run.seed)
    if photos is None:
        loader = make_loader(cfg, split, batch_size=batch_size, train=False)
        total = batches_per_epoch(cfg, split, batch_size, train=False)
    else:
        loader, total = photo_batches(photos, cfg, batch_size), math.ceil(len(photos) / batch_size)
    world, rank = accelerator.num_processes, accelerator.process_index
    first_face = 0
    bar = tqdm(loader, desc=f"evaluate {split}", unit="batch", total=min(total, max_batches or total),
               disable=not accelerator.is_main_process)
    for index, batch in enumerate(bar):
        if max_batches and index >= max_batches:
            break
        real = to_device(batch, accelerator.device)["image"]
        mask = make_masks(cfg.mask, cfg.data.image_size, real.shape[0], masks_rng).to(accelerator.device)
        first_face += real.shape[0]
        if index % world != rank:
            continue
        masked = apply_mask(real, mask)
        fills = {run.name: run.model(masked, mask).float() for run in runs}
        fills[BASELINE] = mean_fill(masked, mask)
        fills[TELEA] = telea_fill(masked, mask)
        for name, filled in fills.items():
            collector.add(name, first_face - real.shape[0], filled, real, mask)
        collector.keep_for_figure(real, mask, fills)
    bar.close()
    return collector


def summarise(rows: list[Row], names: list[str]) -> dict[str, dict[str, float]]:
    """Mean of each metric per row name, plus `n`."""
    summary = {}
    for name in names:
        values = [metrics for row, _, metrics in rows if row == name]
        summary[name] = {m: float(np.mean([v[m] for v in values])) if values else math.nan for m in METRICS}
        summary[name]["n"] = len(values)
    return summary


def per_face(rows: list[Row], name: str) -> dict[str, list[float]]:
    """Each metric's values of one row name, in face order (the same order for every name)."""
    ordered = sorted((index, metrics) for row, index, metrics in rows if row == name)
    return {metric: [metrics[metric] for _, metrics in ordered] for metric in METRICS}


COMPARED = [name for name in METRICS if not name.endswith("_ref")]  # the _ref values are the original's, equal for both


def comparison(runs: list[Run], rows: list[Row], seed: int) -> dict[str, Any] | None:
    """Paired differences (first hybrid-D run - first Pathak-D run) and the verdict; None without both."""
    kinds = {run.cfg.discriminator.kind: run for run in reversed(runs)}
    if "hybrid" not in kinds or "pathak" not in kinds:
        return None
    hybrid, pathak = kinds["hybrid"], kinds["pathak"]
    first, second = per_face(rows, hybrid.name), per_face(rows, pathak.name)
    diffs = paired_differences({m: first[m] for m in COMPARED}, {m: second[m] for m in COMPARED}, seed)
    return {"first": hybrid.name, "second": pathak.name, "seed": seed, "differences": diffs,
            "verdict": sharper_at_equal_psnr(diffs)}


def results_json(runs: list[Run], summary: dict[str, dict[str, float]], split: str, cfg: Config,
                 compared: dict[str, Any] | None = None, photos: Path | None = None) -> dict[str, Any]:
    rows = [{"name": run.name, "path": str(run.path), "discriminator": run.cfg.discriminator.kind,
             "metrics": {m: summary[run.name][m] for m in METRICS}, "n": summary[run.name]["n"]} for run in runs]
    rows += [{"name": name, "path": None, "discriminator": None,
              "metrics": {m: summary[name][m] for m in METRICS}, "n": summary[name]["n"]} for name in BASELINES]
    return {"split": f"photos:{photos}" if photos else split, "shards": None if photos else cfg.data.shards,
            "image_size": cfg.data.image_size,
            "mask": {"kind": cfg.mask.kind, "hole_size": cfg.mask.hole_size, "seed": cfg.run.seed},
            "psnr_ceiling_db": PSNR_CEILING, "runs": rows, "comparison": compared}


def results_markdown(results: dict[str, Any]) -> str:
    headers = ["run", "discriminator", "PSNR (dB)", "SSIM", "L1", "L2", "sharpness", "detail",
               "edge jump (original)", "checkerboard (original)", "colour shift", "saturation shift", "images"]
    table = []
    for row in results["runs"]:
        m = row["metrics"]
        table.append([row["name"], row["discriminator"] or "-", f"{m['psnr']:.2f}", f"{m['ssim']:.4f}",
                      f"{m['l1']:.4f}", f"{m['l2']:.4f}", f"{m['sharpness']:.3f}", f"{m['detail']:.3f}",
                      f"{m['edge_jump']:.1f} ({m['edge_jump_ref']:.1f})",
                      f"{m['checkerboard']:.2f} ({m['checkerboard_ref']:.2f})",
                      f"{m['colour_shift']:.1f}", f"{m['saturation_shift']:+.3f}", row["n"]])
    note = (f"\nSplit `{results['split']}`, {results['mask']['kind']} hole of {results['mask']['hole_size']} px. "
            "PSNR, SSIM, sharpness (Laplacian variance of the fill over the original's; < 1 is blurrier, "
            "noise raises it), detail (share of the original's fine detail the fill reproduces, 1 = all; "
            "noise cannot raise it) and checkerboard (period-2 amplitude, grey levels) on the hole's "
            "bounding box; L1/L2 over the hole's pixels on a [0, 1] scale; edge jump: mean step across "
            "the hole's border (grey levels), the original's in brackets; colour shift: distance of the "
            "hole's mean RGB (grey levels); saturation shift: fill minus original (HSV, 0-1). "
            f"PSNR of an exact fill is capped at {PSNR_CEILING:.0f} dB.\n")
    text = markdown_table(headers, table) + note
    compared = results.get("comparison")
    if compared:
        text += (f"\nPaired differences over the same faces ({compared['first']} - {compared['second']}, "
                 f"bootstrap seed {compared['seed']}):\n\n"
                 + differences_markdown(compared["differences"], compared["first"], compared["second"])
                 + f"\n{compared['verdict']}\n")
    return text


def _cell(image: torch.Tensor, scale: int) -> np.ndarray:
    return to_uint8(F.interpolate(image[None].float(), scale_factor=scale, mode="nearest")[0])


def _zoom(image: torch.Tensor, mask: torch.Tensor, side: int) -> np.ndarray:
    """The hole's box with a margin of a quarter of its side (so seams show), scaled to `side`."""
    top, left, height, width = hole_box(mask)
    margin, size = max(height, width) // 4, image.shape[-1]
    rows = slice(max(0, top - margin), min(size, top + height + margin))
    cols = slice(max(0, left - margin), min(size, left + width + margin))
    crop = image[:, rows, cols][None].float()
    return to_uint8(F.interpolate(crop, size=(side, side), mode="nearest")[0])


def caption(face: dict[str, torch.Tensor], column: str) -> list[str]:
    """The hole's metrics of one figure cell, CAPTION_LINES short lines."""
    real, mask = face["original"][None], face["mask"][None]
    if column == "masked":
        return ["input"]
    values = {name: float(v[0]) for name, v in hole_metrics(face[column][None], real, mask).items()}
    if column == "original":
        return [f"jump {values['edge_jump_ref']:.1f}", f"chk {values['checkerboard_ref']:.2f}"]
    return [f"PSNR {values['psnr']:.1f} SSIM {values['ssim']:.2f}",
            f"detail {values['detail']:.2f} jump {values['edge_jump']:.1f}",
            f"chk {values['checkerboard']:.2f} col {values['colour_shift']:.0f}"]


def _with_caption(picture: np.ndarray, lines: list[str]) -> np.ndarray:
    """`picture` above a white strip of CAPTION_LINES text lines."""
    strip = Image.new("RGB", (picture.shape[1], CAPTION_LINES * LINE_HEIGHT + 2), "white")
    draw = ImageDraw.Draw(strip)
    for index, line in enumerate(lines[:CAPTION_LINES]):
        draw.text((1, 1 + index * LINE_HEIGHT), line, fill="black", font=ImageFont.load_default())
    return np.concatenate([picture, np.asarray(strip)], axis=0)


def figure(faces: list[dict[str, torch.Tensor]], names: list[str]) -> Image.Image:
    """Figure 2 from data: per face a row original | masked | runs | Telea; each cell the face, its
    zoomed hole and that fill's hole metrics."""
    size = faces[0]["original"].shape[-1]
    scale = max(1, math.ceil(FIGURE_CELL / size))
    columns = ["original", "masked", *names, TELEA]
    cells = []
    for face in faces:
        row = []
        for column in columns:
            stacked = np.concatenate([_cell(face[column], scale), _zoom(face[column], face["mask"], size * scale)])
            row.append(_with_caption(stacked, caption(face, column)))
        cells.append(row)
    return image_grid(cells, labels=columns)


def write_outputs(out: Path, runs: list[Run], results: dict[str, Any], faces: list[dict[str, torch.Tensor]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "eval.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    write_text_atomic(out / "eval.md", results_markdown(results))
    if faces:
        figure(faces, [run.name for run in runs]).save(out / "figure.png")
    series = {}
    for run in runs:
        try:
            series[run.name] = [r for r in read_metrics(run.stage_dir) if r.get("split") == "epoch"]
        except ReportError:
            series[run.name] = []
    loss_curves_png(series, out / "losses.png")


EXAMPLES = ["python -m hybridgan.evaluate runs/paper/train-hybrid runs/paper/train-pathak",
            "python -m hybridgan.evaluate runs/paper/train-hybrid --split val --max-batches 4 --out eval-val/",
            "python -m hybridgan.evaluate runs/paper/train-hybrid --photos my-faces/ --out eval-photos/"]


def build_parser() -> argparse.ArgumentParser:
    parser = cli_parser("hybridgan.evaluate", __doc__.split("\n\n")[0].splitlines()[0], EXAMPLES)
    parser.add_argument("runs", nargs="+", help="train stage folders or generator .safetensors files")
    parser.add_argument("--out", type=out_folder, help="output folder (default: runs/<name>/eval)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--batch-size", type=at_least(1), help="default: eval.batch_size of the first run")
    parser.add_argument("--max-batches", type=at_least(0), help="default: eval.max_batches (0 = the whole split)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--shards", help="packed dataset folder (default: data.shards of the first run)")
    source.add_argument("--photos", type=Path, help="a folder of photos to evaluate on instead of a split")
    parser.add_argument("--cpu", action="store_true", help="evaluate on the CPU even when a GPU is present")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cpu = args.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu)
    try:
        runs = load_runs(args.runs, accelerator.device)
        cfg = runs[0].cfg
        if args.shards:
            cfg.data.shards = args.shards
        cfg.data.resampled = False  # every test image exactly once, in pack order
        photos = photo_files(args.photos) if args.photos else None
        if photos is None:
            check_shards(cfg, args.split)
        batch_size = args.batch_size or cfg.eval.batch_size
        max_batches = cfg.eval.max_batches if args.max_batches is None else args.max_batches
        collector = collect(runs, cfg, args.split, batch_size, max_batches, accelerator, photos)
    except (EvalError, ValueError) as err:  # ValueError: a MetricError, ManifestError ... (one line)
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = accelerator.gather_for_metrics(collector.rows, use_gather_object=True)
    if accelerator.is_main_process:
        summary = summarise(rows, [run.name for run in runs] + list(BASELINES))
        results = results_json(runs, summary, args.split, cfg, comparison(runs, rows, cfg.run.seed), args.photos)
        out = args.out or runs[0].stage_dir.parent / "eval"
        write_outputs(out, runs, results, collector.figure)
        print(results_markdown(results))
        print(f"[evaluate] wrote {out}/eval.json, eval.md, figure.png, losses.png")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
