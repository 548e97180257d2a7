"""Fill a hole in any face photo with a trained generator, at the photo's own resolution.

    python -m hybridgan.inpaint --generator runs/paper/train-hybrid photo.jpg --out filled/
    python -m hybridgan.inpaint --generator G.safetensors a.png b.jpg --out filled/ --box 90,60,80,80
    python -m hybridgan.inpaint --generator G.safetensors a.png --out filled/ --mask hole.png
    python -m hybridgan.inpaint --generator G.safetensors photos/ --out filled/ --keep-names

How a photo of W x H pixels is processed (the generator sees S x S images, S = data.image_size):

1. The photo is read as RGB (EXIF orientation applied, alpha dropped). Its hole is a mask at the
   photo's size: `--mask` (a PNG of exactly W x H, white = hole, > 127 counts), `--box TOP,LEFT,H,W`
   (photo pixels), or by default the generator's centre hole scaled to the crop below.
2. The centred square crop of side m = min(W, H) (offsets (W - m) // 2, (H - m) // 2) is the part
   the generator can see; a hole reaching outside it is an error. Inside the crop, hole pixels are
   first set to the mean colour of the known ones, so no hole content leaks into the context, and
   the crop is resized to S x S (bicubic).
3. The hole at S x S marks every small pixel that overlaps an original hole pixel (adaptive max
   pooling), so the generator never keeps a downsampled copy of hole content. A generator trained on
   centre holes (Pathak's) predicts only its central square: a hole outside it is an error.
4. The generator's S x S result is upsampled to m x m (bicubic) and only the hole pixels of the
   original photo are replaced: every pixel outside the mask is the input's, exactly (PNG output).

An argument that is a folder stands for the photos in it (files ending in one of PHOTO_SUFFIXES,
sorted by name, subfolders not included). Outputs per photo: `<stem>_inpainted.png` and
`<stem>_side_by_side.png` (masked | inpainted | original); with `--keep-names`, the fill alone under
the input's own file name, in the format its suffix names (a JPEG output is re-compressed at quality
95, so outside the hole it is close to, not exactly, the input; PNG stays exact). `--out` must then
differ from every input's folder, so no photo is overwritten. Two inputs whose outputs would have
the same name (`a/p1.png` and `b/p1.png`) are refused on one line naming both, before anything is
written. A bad photo or mask is reported on one line and skipped; the others are still written.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from hybridgan.config import Config, cli_parser, out_folder
from hybridgan.data.masks import center_box
from hybridgan.data.photo import PhotoError, open_photo
from hybridgan.exports import ExportError, load_export
from hybridgan.models import ContextEncoder, GeneratorFill, build_generator
from hybridgan.report import image_grid

EXPORT_NAME = "generator.safetensors"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class InpaintError(ValueError):
    """A bad photo, mask or generator; the message names it."""


def resolve_export(run: str | Path) -> Path:
    """The generator export of a train stage folder (`runs/<name>/train-hybrid`) or a direct file."""
    run = Path(run)
    path = run / EXPORT_NAME if run.is_dir() else run
    if not path.is_file():
        where = f"{run}: no {EXPORT_NAME}" if run.is_dir() else f"{run}: generator export not found"
        raise InpaintError(where)
    return path


def load_generator(run: str | Path, device: str | torch.device = "cpu") -> tuple[ContextEncoder, Config]:
    """The generator of a run folder or export file, in eval mode on `device`, with its config."""
    path = resolve_export(run)
    try:
        state, cfg = load_export(path, "generator")
    except ExportError as err:
        raise InpaintError(str(err)) from None
    model = build_generator(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise InpaintError(f"{path}: weights do not fit the generator its config describes "
                           f"({str(err).splitlines()[0]})") from None
    return model.to(device).eval(), cfg


@dataclass
class Crop:
    """The centred square crop of a W x H photo: top-left corner and side, in photo pixels."""

    top: int
    left: int
    side: int

    @classmethod
    def of(cls, width: int, height: int) -> Crop:
        side = min(width, height)
        return cls((height - side) // 2, (width - side) // 2, side)

    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.side), slice(self.left, self.left + self.side)


def read_photo(path: Path) -> np.ndarray:
    """H x W x 3 uint8 RGB; InpaintError naming the file when it is not a readable image."""
    try:
        return np.asarray(open_photo(path.read_bytes(), str(path))).copy()
    except OSError as err:
        raise InpaintError(f"{path}: not a readable image ({err.strerror or err})") from None
    except PhotoError as err:
        raise InpaintError(str(err)) from None


def expand_photos(paths: list[Path]) -> list[Path]:
    """Each folder replaced by its photo files (PHOTO_SUFFIXES, sorted by name); files kept as given."""
    photos = []
    for path in paths:
        if path.is_dir():
            photos += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
        else:
            photos.append(path)
    return photos


def read_mask(path: Path, width: int, height: int) -> np.ndarray:
    """H x W bool hole mask from a PNG of the photo's size (white = hole)."""
    try:
        with Image.open(path) as image:
            mask = np.asarray(image.convert("L")) > 127
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise InpaintError(f"{path}: not a readable mask image ({err})") from None
    if mask.shape != (height, width):
        raise InpaintError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, the photo is {width}x{height}")
    return mask


def parse_box(text: str) -> tuple[int, int, int, int]:
    """`TOP,LEFT,H,W` as four ints (argparse type)."""
    try:
        top, left, height, width = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--box {text!r} is not TOP,LEFT,H,W (four integers)") from None
    if top < 0 or left < 0 or height <= 0 or width <= 0:
        raise argparse.ArgumentTypeError(f"--box {text!r}: need TOP, LEFT >= 0 and H, W > 0")
    return top, left, height, width


def box_mask(box: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    """H x W bool mask of a TOP,LEFT,H,W box that must lie inside the photo."""
    top, left, box_h, box_w = box
    if top + box_h > height or left + box_w > width:
        raise InpaintError(f"--box {top},{left},{box_h},{box_w} reaches outside the {width}x{height} photo")
    mask = np.zeros((height, width), dtype=bool)
    mask[top:top + box_h, left:left + box_w] = True
    return mask


def default_mask(cfg: Config, width: int, height: int) -> np.ndarray:
    """The generator's centre hole scaled to the photo's crop: the photo pixels lying wholly inside it."""
    crop = Crop.of(width, height)
    scale = crop.side / cfg.data.image_size
    top, _, hole = center_box(cfg.data.image_size, cfg.mask.hole_size)
    start, stop = math.ceil(top * scale - 1e-9), math.floor((top + hole) * scale + 1e-9)
    mask = np.zeros((height, width), dtype=bool)
    mask[crop.top + start:crop.top + stop, crop.left + start:crop.left + stop] = True
    return mask


def _check_mask(mask: np.ndarray, crop: Crop, name: str) -> None:
    if not mask.any():
        raise InpaintError(f"{name}: the mask has no hole pixels")
    rows, cols = crop.slices()
    outside = int(mask.sum() - mask[rows, cols].sum())
    if outside:
        raise InpaintError(
            f"{name}: {outside} hole pixels lie outside the centre crop the generator sees "
            f"(rows {crop.top}..{crop.top + crop.side - 1}, columns {crop.left}..{crop.left + crop.side - 1})")


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> [1, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0).unsqueeze(0)


def _check_generator_reach(model: ContextEncoder, small_mask: torch.Tensor, name: str) -> None:
    """A centre-hole generator predicts only its central square; a hole outside it cannot be filled."""
    window = model.hole_window
    if window is None:
        return
    top, left, hole = window
    inside = small_mask[..., top:top + hole, left:left + hole].sum()
    if small_mask.sum() > inside:
        raise InpaintError(
            f"{name}: the mask reaches outside the central {hole}x{hole} hole this generator fills "
            f"(it was trained on centre holes of {model.image_size}x{model.image_size} images)")


@torch.no_grad()
def inpaint(model: ContextEncoder, photo: np.ndarray, mask: np.ndarray, name: str = "photo") -> np.ndarray:
    """The photo with its hole pixels (and only those) replaced by the generator's fill."""
    height, width = mask.shape
    crop = Crop.of(width, height)
    _check_mask(mask, crop, name)
    rows, cols = crop.slices()
    region, hole = photo[rows, cols], mask[rows, cols]
    known_mean = region[~hole].reshape(-1, 3).mean(axis=0) if (~hole).any() else np.full(3, 127.5)
    context = np.where(hole[..., None], np.round(known_mean).astype(np.uint8), region)
    size = model.image_size
    small = _to_tensor(np.array(Image.fromarray(context).resize((size, size), Image.BICUBIC)))
    small_mask = F.adaptive_max_pool2d(torch.from_numpy(hole).float()[None, None], size)
    _check_generator_reach(model, small_mask, name)
    device = next(model.parameters()).device
    filled = GeneratorFill(model)(small.to(device), small_mask.to(device)).float().cpu()
    upsampled = F.interpolate(filled, size=(crop.side, crop.side), mode="bicubic", align_corners=False)
    fill = ((upsampled[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    result = photo.copy()
    result[rows, cols] = np.where(hole[..., None], fill, region)
    return result


def side_by_side(photo: np.ndarray, mask: np.ndarray, result: np.ndarray) -> Image.Image:
    """masked (hole mid-grey, as the generator sees it) | inpainted | original."""
    masked = np.where(mask[..., None], np.uint8(128), photo)
    return image_grid([[masked, result, photo]], labels=["masked", "inpainted", "original"], pad=4)


def process(model: ContextEncoder, cfg: Config, image: Path, out: Path,
            mask_png: Path | None, box: tuple[int, int, int, int] | None, keep_names: bool = False) -> Path:
    """Inpaint one photo into `out`: `<stem>_inpainted.png` and `<stem>_side_by_side.png`, or with
    `keep_names` the fill alone under the photo's own name (format from its suffix)."""
    photo = read_photo(image)
    height, width = photo.shape[:2]
    if mask_png is not None:
        mask = read_mask(mask_png, width, height)
    elif box is not None:
        mask = box_mask(box, width, height)
    else:
        mask = default_mask(cfg, width, height)
    result = inpaint(model, photo, mask, name=str(image))
    target = output_name(image, out, keep_names)
    if keep_names:
        Image.fromarray(result).save(target, quality=95)
        return target
    Image.fromarray(result).save(target)
    side_by_side(photo, mask, result).save(out / f"{image.stem}_side_by_side.png")
    return target


def output_name(image: Path, out: Path, keep_names: bool) -> Path:
    """Where `process` writes the fill of `image` (its side-by-side goes beside it, by the same stem)."""
    return out / image.name if keep_names else out / f"{image.stem}_inpainted.png"


def output_clash(images: list[Path], out: Path, keep_names: bool) -> str | None:
    """One line naming two inputs whose outputs would be the same file (compared without case, as
    on macOS and Windows file systems), or None."""
    seen: dict[str, Path] = {}
    for image in images:
        target = output_name(image, out, keep_names)
        first = seen.setdefault(str(target).lower(), image)
        if first is not image:
            return (f"{first} and {image} would both be written to {target}; "
                    f"inpaint them into different --out folders")
    return None


def join_box_value(argv: list[str]) -> list[str]:
    """`--box -1,...` as `--box=-1,...`: argparse takes a value that starts with '-' for an option and
    would answer "expected one argument" instead of the box's own error."""
    joined = list(argv)
    for index, item in enumerate(joined[:-1]):
        if item == "--box":
            joined[index:index + 2] = [f"--box={joined[index + 1]}"]
            break
    return joined


def build_parser() -> argparse.ArgumentParser:
    parser = cli_parser("hybridgan.inpaint", __doc__.split("\n\n")[0].splitlines()[0], [
        "python -m hybridgan.inpaint --generator runs/paper/train-hybrid photo.jpg --out filled/",
        "python -m hybridgan.inpaint --generator G.safetensors a.png b.jpg --out filled/ --box 90,60,80,80",
        "python -m hybridgan.inpaint --generator G.safetensors photos/ --out filled/ --keep-names"])
    parser.add_argument("--generator", required=True, help="train stage folder or generator .safetensors")
    parser.add_argument("images", nargs="+", type=Path, help="photos (JPEG/PNG, any size) or folders of them")
    parser.add_argument("--out", required=True, type=out_folder, help="output folder")
    parser.add_argument("--keep-names", action="store_true",
                        help="write each fill under its input's file name (no side-by-side)")
    hole = parser.add_mutually_exclusive_group()
    hole.add_argument("--mask", type=Path, help="PNG of the photo's size, white = hole")
    hole.add_argument("--box", type=parse_box, help="TOP,LEFT,H,W in photo pixels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(join_box_value(sys.argv[1:] if argv is None else argv))
    try:
        model, cfg = load_generator(args.generator, args.device)
    except InpaintError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    images = expand_photos(args.images)
    if args.keep_names:
        clash = next((image for image in images if image.parent.resolve() == args.out.resolve()), None)
        if clash is not None:
            print(f"error: --out {args.out} holds the input {clash}; --keep-names would overwrite it", file=sys.stderr)
            return 2
    clash = output_clash(images, args.out, args.keep_names)
    if clash is not None:
        print(f"error: {clash}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for image in images:
        try:
            print(process(model, cfg, image, args.out, args.mask, args.box, args.keep_names))
        except InpaintError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
