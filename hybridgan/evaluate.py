"""Compare trained generators on the test split: hole metrics, the paper's Figure 2 and Table 2 curves.

    python -m hybridgan.evaluate runs/paper/train-hybrid runs/paper/train-pathak [--out DIR]
        [--split test] [--batch-size N] [--max-batches N] [--shards DIR] [--cpu]

Each RUN is a train stage folder holding `generator.safetensors`, or an export file itself. The
data (`data.shards`, `data.image_size`) and the holes (`mask`, seeded with `run.seed`) come from
the first RUN's config (`--shards` overrides the folder); every RUN must share its image size.
One pass over the split feeds every generator and the mean-colour fill baseline the same images
and masks. Every rank reads the whole split and handles every world_size-th batch (so the masks
and the numbers do not depend on the number of processes); per-image values are gathered with
`gather_for_metrics` and the main process writes, into `--out` (default: `runs/<name>/eval/`
next to the first RUN's stage folder):

- `eval.json`: per row (each RUN, then the baseline) name, path, discriminator kind, metrics, n;
- `eval.md`: the same as a Markdown table;
- `figure.png`: test faces, columns masked | RUN 1 | RUN 2 | ... | original, each face followed by
  a row of zoomed crops of its hole (the eyes and nose of an aligned face under the centre hole),
  `eval.figure_rows` faces from the first batches (none and no figure when 0);
- `losses.png`: gen_adv_loss, gen_pixel_loss, disc_loss per epoch from each RUN's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image
from tqdm import tqdm

from hybridgan.config import Config
from hybridgan.data.loader import batches_per_epoch, make_loader, to_device
from hybridgan.data.manifest import ManifestError, shard_urls
from hybridgan.data.masks import apply_mask, make_masks
from hybridgan.inpaint import InpaintError, load_generator, resolve_export
from hybridgan.metrics import METRICS, PSNR_CEILING, hole_box, hole_metrics, mean_fill
from hybridgan.models import ContextEncoder
from hybridgan.report import ReportError, image_grid, loss_curves_png, markdown_table, read_metrics, to_uint8

BASELINE = "mean-colour fill"
FIGURE_CELL = 128  # faces are scaled up (nearest) to at least this many pixels a side in figure.png


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


class Collector:
    """Per-image metric rows of this rank, and the first faces of the figure (main process)."""

    def __init__(self, names: list[str], figure_rows: int) -> None:
        self.names, self.figure_rows = names, figure_rows
        self.rows: list[tuple[str, dict[str, float]]] = []
        self.figure: list[dict[str, torch.Tensor]] = []

    def add(self, name: str, filled: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> None:
        values = hole_metrics(filled, real, mask)
        for i in range(real.shape[0]):
            self.rows.append((name, {metric: float(values[metric][i]) for metric in METRICS}))

    def keep_for_figure(self, real: torch.Tensor, mask: torch.Tensor, fills: dict[str, torch.Tensor]) -> None:
        for i in range(min(real.shape[0], self.figure_rows - len(self.figure))):
            face = {"masked": apply_mask(real[i], mask[i]), "original": real[i], "mask": mask[i]}
            face.update({name: fills[name][i] for name in self.names})
            self.figure.append({key: value.detach().cpu() for key, value in face.items()})


@torch.no_grad()
def collect(runs: list[Run], cfg: Config, split: str, batch_size: int, max_batches: int,
            accelerator: Accelerator) -> Collector:
    """One pass over the split: every run and the baseline on the same images and masks."""
    names = [run.name for run in runs]
    collector = Collector(names, cfg.eval.figure_rows if accelerator.is_main_process else 0)
    masks_rng = torch.Generator().manual_seed(cfg.run.seed)
    loader = make_loader(cfg, split, batch_size=batch_size, train=False)
    total = batches_per_epoch(cfg, split, batch_size, train=False)
    world, rank = accelerator.num_processes, accelerator.process_index
    bar = tqdm(loader, desc=f"evaluate {split}", unit="batch", total=min(total, max_batches or total),
               disable=not accelerator.is_main_process)
    for index, batch in enumerate(bar):
        if max_batches and index >= max_batches:
            break
        real = to_device(batch, accelerator.device)["image"]
        mask = make_masks(cfg.mask, cfg.data.image_size, real.shape[0], masks_rng).to(accelerator.device)
        if index % world != rank:
            continue
        masked = apply_mask(real, mask)
        fills = {run.name: run.model(masked, mask).float() for run in runs}
        fills[BASELINE] = mean_fill(masked, mask)
        for name, filled in fills.items():
            collector.add(name, filled, real, mask)
        collector.keep_for_figure(real, mask, fills)
    bar.close()
    return collector


def summarise(rows: list[tuple[str, dict[str, float]]], names: list[str]) -> dict[str, dict[str, float]]:
    """Mean of each metric per row name, plus `n`."""
    summary = {}
    for name in names:
        values = [metrics for row, metrics in rows if row == name]
        summary[name] = {m: float(np.mean([v[m] for v in values])) if values else math.nan for m in METRICS}
        summary[name]["n"] = len(values)
    return summary


def results_json(runs: list[Run], summary: dict[str, dict[str, float]], split: str, cfg: Config) -> dict[str, Any]:
    rows = [{"name": run.name, "path": str(run.path), "discriminator": run.cfg.discriminator.kind,
             "metrics": {m: summary[run.name][m] for m in METRICS}, "n": summary[run.name]["n"]} for run in runs]
    rows.append({"name": BASELINE, "path": None, "discriminator": None,
                 "metrics": {m: summary[BASELINE][m] for m in METRICS}, "n": summary[BASELINE]["n"]})
    return {"split": split, "shards": cfg.data.shards, "image_size": cfg.data.image_size,
            "mask": {"kind": cfg.mask.kind, "hole_size": cfg.mask.hole_size, "seed": cfg.run.seed},
            "psnr_ceiling_db": PSNR_CEILING, "runs": rows}


def results_markdown(results: dict[str, Any]) -> str:
    headers = ["run", "discriminator", "PSNR (dB)", "SSIM", "L1", "L2", "sharpness", "images"]
    table = [[row["name"], row["discriminator"] or "-", f"{row['metrics']['psnr']:.2f}",
              f"{row['metrics']['ssim']:.4f}", f"{row['metrics']['l1']:.4f}", f"{row['metrics']['l2']:.4f}",
              f"{row['metrics']['sharpness']:.3f}", row["n"]] for row in results["runs"]]
    note = (f"\nSplit `{results['split']}`, {results['mask']['kind']} hole of {results['mask']['hole_size']} px. "
            "PSNR, SSIM and sharpness (Laplacian variance of the fill over the original's; < 1 is blurrier) "
            "on the hole's bounding box, L1/L2 over the hole's pixels, images on a [0, 1] scale; "
            f"PSNR of an exact fill is capped at {PSNR_CEILING:.0f} dB.\n")
    return markdown_table(headers, table) + note


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


def figure(faces: list[dict[str, torch.Tensor]], names: list[str]) -> Image.Image:
    """Figure 2 from data: per face a row masked | runs | original and a row of zoomed hole crops."""
    size = faces[0]["original"].shape[-1]
    scale = max(1, math.ceil(FIGURE_CELL / size))
    columns = ["masked", *names, "original"]
    cells = []
    for face in faces:
        cells.append([_cell(face[column], scale) for column in columns])
        cells.append([_zoom(face[column], face["mask"], size * scale) for column in columns])
    return image_grid(cells, labels=columns)


def write_outputs(out: Path, runs: list[Run], results: dict[str, Any], faces: list[dict[str, torch.Tensor]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / "eval.json", json.dumps(results, indent=2) + "\n")
    _atomic_text(out / "eval.md", results_markdown(results))
    if faces:
        figure(faces, [run.name for run in runs]).save(out / "figure.png")
    series = {}
    for run in runs:
        try:
            series[run.name] = [r for r in read_metrics(run.stage_dir) if r.get("split") == "epoch"]
        except ReportError:
            series[run.name] = []
    loss_curves_png(series, out / "losses.png")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hybridgan.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="train stage folders or generator .safetensors files")
    parser.add_argument("--out", type=Path, help="output folder (default: runs/<name>/eval)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--batch-size", type=int, help="default: eval.batch_size of the first run")
    parser.add_argument("--max-batches", type=int, help="default: eval.max_batches (0 = the whole split)")
    parser.add_argument("--shards", help="packed dataset folder (default: data.shards of the first run)")
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
        check_shards(cfg, args.split)
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    batch_size = args.batch_size or cfg.eval.batch_size
    max_batches = cfg.eval.max_batches if args.max_batches is None else args.max_batches
    collector = collect(runs, cfg, args.split, batch_size, max_batches, accelerator)
    rows = accelerator.gather_for_metrics(collector.rows, use_gather_object=True)
    if accelerator.is_main_process:
        results = results_json(runs, summarise(rows, [run.name for run in runs] + [BASELINE]), args.split, cfg)
        out = args.out or runs[0].stage_dir.parent / "eval"
        write_outputs(out, runs, results, collector.figure)
        print(results_markdown(results))
        print(f"[evaluate] wrote {out}/eval.json, eval.md, figure.png, losses.png")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
