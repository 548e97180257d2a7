"""Compare trained generators on the test split: hole metrics, the paper's Figure 2 and Table 2 curves.

    python -m hybridgan.evaluate runs/paper/train-hybrid runs/paper/train-pathak [--out DIR]
        [--split test] [--batch-size N] [--max-batches N] [--shards DIR | --photos DIR] [--cpu]
        [--lpips-weights FILE] [--inception-weights FILE]

Each RUN is a train stage folder holding `generator.safetensors`, or an export file itself. The
data (`data.shards`, `data.image_size`) and the holes (`mask`, seeded with `run.seed`) come from
the first RUN's config (`--shards` overrides the folder); every RUN must share its image size.
`--photos DIR` evaluates a folder of photos instead (any size; the files `inpaint` takes from a
folder, sorted by name): each is read as `pack` reads a source (8-bit RGB, EXIF orientation, the
centred square of side min(W, H) resized to `pack.source_size`), then seen as the test split is
(the centred `data.crop_fraction` crop resized to `data.image_size`).
One pass over the split feeds every generator and two baselines the same images and masks: the
mean-colour fill and OpenCV's classical Telea inpainting (`cv2.inpaint`, radius 3, on the 8-bit face). Every rank reads the whole split and handles every world_size-th batch (so the masks
and the numbers do not depend on the number of processes); the means over the faces of every rank
are `hybridgan.distributed.mean_over_ranks`, the per-image values (for the paired comparisons) are
gathered with `gather_for_metrics`, and the main process writes, into `--out` (default:
`runs/<name>/eval/` next to the first RUN's stage folder):

- `eval.json` (strict JSON: null where a value is undefined): per row (each RUN, then the two
  baselines) name, path, discriminator kind, metrics (the hole metrics and `lpips`, means over the
  faces), `set_metrics` (`fid`, `kid_mean`, `kid_std`, `kid_subset` of the row's composited images
  against the original faces), n; `perceptual`: one line per perceptual metric (`lpips`, `fid_kid`),
  what was computed or why it was skipped (`hybridgan/perceptual.py`: the weights are staged files,
  `eval.lpips_weights` and `eval.inception_weights` or the options of the same name; without them
  the perceptual metrics are null and everything else is computed);
  and, when the RUNs include a hybrid-D and a Pathak-D generator (the first of each), `comparison`:
  the paired difference (hybrid - Pathak) of every metric over the same faces with a seeded
  bootstrap 95 % interval, and `verdict`, one sentence on whether the hybrid is sharper at equal
  PSNR (`report.sharper_at_equal_psnr` states the rule); `comparisons`: every pair of Pathak - none,
  hybrid - none, hybrid - Pathak whose kinds are evaluated, with the paired differences (and of
  `hf_gap`, the distance of the fill's high-frequency energy from the original's) and the outcome of
  `report.sharper_than`; `answers`: in words, does any discriminator beat none, does the hybrid
  beat Pathak's;
- `eval.md`: the same as Markdown tables (the perceptual metrics in a table of their own) and the verdicts;
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
from hybridgan.distributed import end_process_group, mean_over_ranks
from hybridgan.inpaint import InpaintError, expand_photos, load_generator, resolve_export
from hybridgan.metrics import METRICS, PSNR_CEILING, hole_box, hole_metrics, mean_fill
from hybridgan.models import ContextEncoder
from hybridgan.perceptual import Perceptual, load_perceptual, set_metrics
from hybridgan.report import (
    ReportError, differences_markdown, hf_gap, image_grid, loss_curves_png, markdown_table, paired_differences,
    read_metrics, sharper_at_equal_psnr, sharper_than, to_uint8,
)

BASELINE = "mean-colour fill"
TELEA = "OpenCV Telea"
BASELINES = (BASELINE, TELEA)
ORIGINAL = "original"  # the split's own faces, the reference set of FID and KID
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
Features = tuple[str, int, torch.Tensor]  # name, index of the batch's first face, InceptionV3 features [n, 2048]


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
    """Per-image metric rows and InceptionV3 features of this rank, and the first faces of the figure
    (main process). `metrics` are the hole metrics, and `lpips` when its network is loaded."""

    def __init__(self, names: list[str], figure_rows: int, perceptual: Perceptual) -> None:
        self.names, self.figure_rows, self.perceptual = names, figure_rows, perceptual
        self.metrics = [*METRICS, *(["lpips"] if perceptual.lpips_net is not None else [])]
        self.rows: list[Row] = []
        self.features: list[Features] = []
        self.figure: list[dict[str, torch.Tensor]] = []

    def add(self, name: str, first_face: int, filled: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> None:
        values = hole_metrics(filled, real, mask)
        if self.perceptual.lpips_net is not None:
            values["lpips"] = self.perceptual.lpips(filled, real)
        for i in range(real.shape[0]):
            self.rows.append((name, first_face + i, {metric: float(values[metric][i]) for metric in self.metrics}))
        self.add_features(name, first_face, filled)

    def add_features(self, name: str, first_face: int, images: torch.Tensor) -> None:
        if self.perceptual.inception is not None:
            self.features.append((name, first_face, self.perceptual.features(images).cpu()))

    def keep_for_figure(self, real: torch.Tensor, mask: torch.Tensor, fills: dict[str, torch.Tensor]) -> None:
        for i in range(min(real.shape[0], self.figure_rows - len(self.figure))):
            face = {"masked": apply_mask(real[i], mask[i]), "original": real[i], "mask": mask[i]}
            face.update({name: fills[name][i] for name in [*self.names, TELEA]})
            self.figure.append({key: value.detach().cpu() for key, value in face.items()})


@torch.no_grad()
def collect(runs: list[Run], cfg: Config, split: str, batch_size: int, max_batches: int,
            accelerator: Accelerator, photos: list[Path] | None = None,
            perceptual: Perceptual | None = None) -> Collector:
    """One pass over the split (or the photo files): every run and the baseline on the same images and masks."""
    names = [run.name for run in runs]
    perceptual = perceptual or Perceptual(None, None, {})
    collector = Collector(names, cfg.eval.figure_rows if accelerator.is_main_process else 0, perceptual)
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
        collector.add_features(ORIGINAL, first_face - real.shape[0], real)
        for name, filled in fills.items():
            collector.add(name, first_face - real.shape[0], filled, real, mask)
        collector.keep_for_figure(real, mask, fills)
    bar.close()
    return collector


def summarise(rows: list[Row], names: list[str], metrics: list[str],
              accelerator: Accelerator) -> dict[str, dict[str, float]]:
    """Mean of each metric per row name over the faces of every rank (`mean_over_ranks`; this rank's
    `rows`), plus `n`, the number of faces. Every rank calls it."""
    summary = {}
    for name in names:
        values = [row_metrics for row, _, row_metrics in rows if row == name]
        means, n = mean_over_ranks(accelerator, {m: sum(v[m] for v in values) for m in metrics}, len(values))
        summary[name] = {**{m: means[m] for m in metrics}, "n": n}
    return summary


def per_face(rows: list[Row], name: str, metrics: list[str]) -> dict[str, list[float]]:
    """Each metric's values of one row name, in face order (the same order for every name)."""
    ordered = sorted((index, row_metrics) for row, index, row_metrics in rows if row == name)
    return {metric: [row_metrics[metric] for _, row_metrics in ordered] for metric in metrics}


PAIRS = (("pathak", "none"), ("hybrid", "none"), ("hybrid", "pathak"))  # (first, second) by D kind


def pairwise(runs: list[Run], rows: list[Row], summary: dict[str, dict[str, float]], seed: int,
             metrics: list[str]) -> list[dict[str, Any]]:
    """For each pair of PAIRS whose kinds are both evaluated (the first run of each kind): the paired
    differences of every compared metric and of `hf_gap`, and `report.sharper_than`'s outcome."""
    kinds = {run.cfg.discriminator.kind: run for run in reversed(runs)}
    compared = [name for name in metrics if not name.endswith("_ref")]  # the _ref values are the original's
    out = []
    for first_kind, second_kind in PAIRS:
        if first_kind not in kinds or second_kind not in kinds:
            continue
        first, second = kinds[first_kind], kinds[second_kind]
        a, b = per_face(rows, first.name, compared), per_face(rows, second.name, compared)
        a["hf_gap"], b["hf_gap"] = hf_gap(a["sharpness"]), hf_gap(b["sharpness"])
        diffs = paired_differences(a, b, seed)
        outcome, sentence = sharper_than(diffs, summary[first.name], first.name, second.name)
        out.append({"first": first.name, "second": second.name, "first_kind": first_kind,
                    "second_kind": second_kind, "seed": seed, "differences": diffs, "outcome": outcome,
                    "verdict": sentence})
    return out


def comparison(pairs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The hybrid - Pathak pair of `pairwise` under the earlier rule (`report.sharper_at_equal_psnr`),
    without `hf_gap`; None without both kinds."""
    pair = next((p for p in pairs if (p["first_kind"], p["second_kind"]) == ("hybrid", "pathak")), None)
    if pair is None:
        return None
    diffs = {name: diff for name, diff in pair["differences"].items() if name != "hf_gap"}
    return {"first": pair["first"], "second": pair["second"], "seed": pair["seed"], "differences": diffs,
            "verdict": sharper_at_equal_psnr(diffs)}


def answers(compared: list[dict[str, Any]]) -> dict[str, str]:
    """The two questions the evaluation exists for, answered in words from `pairwise`'s outcomes."""
    by_kinds = {(c["first_kind"], c["second_kind"]): c for c in compared}
    against_none = [c for c in compared if c["second_kind"] == "none"]
    out = {}
    if against_none:
        sharper = [c["first"] for c in against_none if c["outcome"] == "sharper"]
        inert = [c["first"] for c in against_none if c["outcome"] == "no different"]
        words = [f"yes: {', '.join(sharper)} fills sharper than no discriminator" if sharper
                 else "no: no discriminator made the fill sharper than no discriminator"]
        if inert:
            words.append(f"{', '.join(inert)}: the discriminator did not move G beyond the no-D baseline")
        out["does any discriminator beat no discriminator?"] = "; ".join(words) + "."
    if ("hybrid", "pathak") in by_kinds:
        outcome = by_kinds[("hybrid", "pathak")]["outcome"]
        out["does the hybrid beat Pathak's?"] = {
            "sharper": "yes: the hybrid fill is sharper than Pathak's.",
            "sharper with artefacts": "no: the hybrid fill has more high frequencies than Pathak's, with artefacts.",
            "blurrier": "no: the hybrid fill is blurrier than Pathak's.",
            "no different": "no: the hybrid fill is neither sharper nor blurrier than Pathak's.",
        }[outcome]
    return out


def gathered_features(features: list[Features]) -> dict[str, torch.Tensor]:
    """Each name's features of all ranks in face order (so the sets do not depend on the world size)."""
    by_name: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, first_face, values in features:
        by_name.setdefault(name, []).append((first_face, values))
    return {name: torch.cat([values for _, values in sorted(parts, key=lambda part: part[0])])
            for name, parts in by_name.items()}


def perceptual_sets(features: list[Features], names: list[str], seed: int) -> dict[str, dict[str, Any]]:
    """FID and KID of each name's fills against the original faces; None values without features."""
    sets = gathered_features(features)
    empty = torch.zeros(0, 1)
    return {name: set_metrics(sets.get(ORIGINAL, empty), sets.get(name, empty), seed) for name in names}


def results_json(runs: list[Run], summary: dict[str, dict[str, float]], split: str, cfg: Config,
                 compared: dict[str, Any] | None = None, photos: Path | None = None,
                 perceptual: dict[str, Any] | None = None, pairs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`perceptual`: {"notes": {"lpips", "fid_kid"}, "sets": {name: set_metrics}} of `perceptual_sets`."""
    perceptual = perceptual or {"notes": {}, "sets": {}}
    sets = perceptual["sets"]

    def row(name: str, path: Path | None, kind: str | None) -> dict[str, Any]:
        metrics = {m: value for m, value in summary[name].items() if m != "n"}
        metrics.setdefault("lpips", None)  # a skipped LPIPS (eval.json's `perceptual` says why)
        return {"name": name, "path": str(path) if path else None, "discriminator": kind, "metrics": metrics,
                "set_metrics": sets.get(name), "n": summary[name]["n"]}

    rows = [row(run.name, run.path, run.cfg.discriminator.kind) for run in runs]
    rows += [row(name, None, None) for name in BASELINES]
    return {"split": f"photos:{photos}" if photos else split, "shards": None if photos else cfg.data.shards,
            "image_size": cfg.data.image_size,
            "mask": {"kind": cfg.mask.kind, "hole_size": cfg.mask.hole_size, "seed": cfg.run.seed},
            "psnr_ceiling_db": PSNR_CEILING, "perceptual": perceptual["notes"], "runs": rows,
            "comparison": compared, "comparisons": pairs or [], "answers": answers(pairs or [])}


def _or_dash(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def perceptual_markdown(results: dict[str, Any]) -> str:
    """The perceptual table (LPIPS mean per face; FID, KID of the set) and one line per metric's status."""
    table = []
    for row in results["runs"]:
        sets = row.get("set_metrics") or {}
        kid = (f"{sets['kid_mean']:.3g} ± {sets['kid_std']:.2g}" if sets.get("kid_mean") is not None else "-")
        table.append([row["name"], _or_dash(row["metrics"].get("lpips"), ".4f"), _or_dash(sets.get("fid"), ".3g"),
                      kid, row["n"]])
    notes = results.get("perceptual") or {}
    lines = "".join(f"- {metric}: {note}\n" for metric, note in notes.items())
    return ("\nPerceptual metrics (docs/quality.md): LPIPS per face on the whole composited image (lower is "
            "closer); FID and KID (mean ± std over subsets) of each fill's set against the original faces.\n\n"
            + markdown_table(["run", "LPIPS", "FID", "KID", "images"], table) + "\n" + lines)


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
    text = markdown_table(headers, table) + note + perceptual_markdown(results)
    if results.get("answers"):
        text += "\n" + "\n".join(f"- **{question}** {answer}" for question, answer in results["answers"].items()) + "\n"
    for pair in results.get("comparisons", []):
        text += (f"\n{pair['first']} - {pair['second']} over the same faces (bootstrap seed {pair['seed']}):\n\n"
                 + differences_markdown(pair["differences"], pair["first"], pair["second"])
                 + f"\n{pair['verdict']}\n")
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


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float (a mean over no faces, say) as None: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def write_outputs(out: Path, runs: list[Run], results: dict[str, Any], faces: list[dict[str, torch.Tensor]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "eval.json", json.dumps(strict_json(results), indent=2, allow_nan=False) + "\n")
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
    parser.add_argument("--lpips-weights", help="staged LPIPS backbone weights (default: eval.lpips_weights "
                        "of the first run; docs/quality.md)")
    parser.add_argument("--inception-weights", help="staged InceptionV3 weights of FID and KID (default: "
                        "eval.inception_weights of the first run; docs/quality.md)")
    parser.add_argument("--cpu", action="store_true", help="evaluate on the CPU even when a GPU is present")
    return parser


def perceptual_networks(cfg: Config, args: argparse.Namespace, accelerator: Accelerator) -> Perceptual:
    """The LPIPS and InceptionV3 networks of the staged weights (the command line's, else the first run's
    eval.* keys) on the device; the main process prints one line per skipped metric."""
    if args.lpips_weights is not None:
        cfg.eval.lpips_weights = args.lpips_weights
    if args.inception_weights is not None:
        cfg.eval.inception_weights = args.inception_weights
    perceptual = load_perceptual(cfg.eval.lpips_weights, cfg.eval.inception_weights, cfg.eval.lpips_net)
    if accelerator.is_main_process:
        for metric, note in perceptual.notes.items():
            if note.startswith("skipped"):
                print(f"[evaluate] {metric} {note}")
    return perceptual.to(accelerator.device)


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
        perceptual = perceptual_networks(cfg, args, accelerator)
        collector = collect(runs, cfg, args.split, batch_size, max_batches, accelerator, photos, perceptual)
    except (EvalError, ValueError) as err:  # ValueError: a MetricError, ManifestError ... (one line)
        print(f"error: {err}", file=sys.stderr)
        return 2
    names = [run.name for run in runs] + list(BASELINES)
    summary = summarise(collector.rows, names, collector.metrics, accelerator)
    rows = accelerator.gather_for_metrics(collector.rows, use_gather_object=True)
    features = accelerator.gather_for_metrics(collector.features, use_gather_object=True)
    if accelerator.is_main_process:
        sets = perceptual_sets(features, names, cfg.run.seed)
        pairs = pairwise(runs, rows, summary, cfg.run.seed, collector.metrics)
        results = results_json(runs, summary, args.split, cfg, comparison(pairs), args.photos,
                               {"notes": perceptual.notes, "sets": sets}, pairs)
        out = args.out or runs[0].stage_dir.parent / "eval"
        write_outputs(out, runs, results, collector.figure)
        print(results_markdown(results))
        print(f"[evaluate] wrote {out}/eval.json, eval.md, figure.png, losses.png")
    accelerator.wait_for_everyone()
    end_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
