"""Pack a folder, a zip or `synthetic:N` into WebDataset tar shards plus `manifest.json`.

    python -m hybridgan.pack SOURCE [--out DIR] [--config FILE|NAME] [--workers N] [--skip-bad] [key=value ...]
    python -m hybridgan.pack --verify shards/NAME

`--out` defaults to the config's `data.shards`, the folder the training stages read.

Every file whose suffix is a format Pillow reads is an image (`hybridgan.data.photo`: converted to
8-bit RGB, EXIF orientation applied); every other file is listed in the manifest as `not_images`
and counted in the summary, never dropped silently. An image that does not decode (or a damaged
zip member) stops the pack with one line naming it; with `--skip-bad` it is skipped and listed,
with the reason, in the manifest's `skipped_files` and in the summary.

Every sample is `KEY.jpg` (`pack.source_size` square: centre-cropped and resized when the source
differs; an upright RGB JPEG of exactly that size is stored byte for byte) and `KEY.json` (source
name, original size, split). KEY is the source's relative path with every character other than
letters, digits, `_` and `-` replaced by `_` (WebDataset splits names at the first dot).

Split: keys are ordered by the sha256 of the key; the first round(N * val_fraction) are val, the
next round(N * test_fraction) test, the rest train (30,000 -> 1,000/1,000/28,000). The split of a
key depends on the set of keys only, never on the source's order; adding images moves only keys whose
hash lies at a split boundary. Each split's keys, in that order, are cut into shards of
`pack.shard_size`: a shard is a fixed, independent unit of work. A val or test split that would be
empty (too few images for the fractions, or every one of them unreadable) is an error at pack time.

Restartable and verified: `plan.json` (the shard plan) is written first; each shard is written to
`.NAME.tmp` and renamed when complete, with `.NAME.done.json` (its count, size, sha256 and skipped
files) written just before; `manifest.json` is written last, atomically, with each shard's size and
sha256. A re-run over the same folder re-hashes every shard it would keep against what wrote it (the
manifest, or the shard's `.done.json` for an interrupted pack) and re-packs from the source, naming
them, the shards that are missing, differ, or have no record of their hash (a pack whose manifest
was lost is never adopted as it is); the shards that match are left untouched. A folder holding a
different plan is an error. `--verify` re-hashes every shard against the manifest without writing
(`hybridgan.data.manifest`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import re
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

import hybridgan
from hybridgan.atomic import write_text_atomic
from hybridgan.config import PackConfig, add_config_arguments, cli_parser, config_from_args
from hybridgan.data.manifest import MANIFEST, SPLITS, ManifestError, verify_shards
from hybridgan.data.photo import PhotoError, is_photo_name, is_plain_frame, open_photo, square_frame
from hybridgan.data.synthetic import synthetic_face

PLAN = "plan.json"
SHOWN_NAMES = 20
"""How many skipped or ignored file names the summary line prints (the manifest lists them all)."""
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError)
"""What reading a damaged (bad CRC, truncated, undecompressable) or encrypted zip member raises."""


class PackError(ValueError):
    """Bad source, bad image or an output folder holding something else; one line naming it."""


@dataclass(frozen=True)
class Source:
    """Where images come from: kind is "folder", "zip" or "synthetic"; refs index into it.

    `ignored` are the source's files that are not images (by suffix), listed in the manifest.
    """

    kind: str
    root: str
    refs: tuple[str, ...]
    ignored: tuple[str, ...] = ()

    def describe(self) -> str:
        return self.root if self.kind != "synthetic" else f"synthetic:{len(self.refs)}"


def _open_source(source: str) -> Source:
    """The source named by the CLI argument, with its image references (sorted)."""
    if not source.strip():
        raise PackError("no source given (data.source is empty): pass a folder, a .zip or synthetic:N")
    if source.startswith("synthetic:"):
        count = source.split(":", 1)[1]
        if not count.isdigit() or int(count) == 0:
            raise PackError(f"source {source!r}: expected synthetic:N with N a positive integer")
        return Source("synthetic", source, tuple(str(i) for i in range(int(count))))
    path = Path(source)
    if path.is_dir():
        files = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
        kind = "folder"
    elif path.is_file() and path.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(path) as archive:
                files = [n for n in archive.namelist() if not n.endswith("/")]
        except (zipfile.BadZipFile, OSError) as err:
            raise PackError(f"{path}: not a readable zip file ({err})") from None
        kind = "zip"
    else:
        raise PackError(f"source {source}: not a folder, a .zip file or synthetic:N")
    # macOS zips carry a resource fork per file under __MACOSX/, with the image's name: not images.
    refs = sorted(f for f in files if is_photo_name(f) and not f.startswith("__MACOSX/"))
    if not refs:
        raise PackError(f"source {source}: no image files found (suffixes of the formats Pillow reads: "
                        f".jpg, .png, .gif, .webp, .tif, .bmp ...)")
    taken = set(refs)
    return Source(kind, str(path.resolve()), tuple(refs), tuple(sorted(f for f in files if f not in taken)))


def sample_key(ref: str) -> str:
    """The WebDataset key of a source reference: no dots, no slashes."""
    return re.sub(r"[^0-9A-Za-z_-]", "_", ref)


def _key_of(source: Source, ref: str) -> str:
    return f"face_{int(ref):06d}" if source.kind == "synthetic" else sample_key(ref)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def split_sizes(total: int, cfg: PackConfig) -> dict[str, int]:
    """Samples per split: round-half-up of the fractions for val and test, the rest train."""
    val = math.floor(total * cfg.val_fraction + 0.5)
    test = math.floor(total * cfg.test_fraction + 0.5)
    return {"train": total - val - test, "val": val, "test": test}


def _check_split_sizes(sizes: dict[str, int], what: str) -> None:
    """PackError when val or test would be empty: training and evaluation need both."""
    empty = [split for split in ("val", "test") if sizes[split] == 0]
    if empty:
        counts = ", ".join(f"{split} {sizes[split]}" for split in SPLITS)
        keys = " and ".join(f"pack.{split}_fraction" for split in empty)
        raise PackError(f"{what} give an empty {' and '.join(empty)} split ({counts}): "
                        f"add images or raise {keys}")


def make_plan(source: Source, cfg: PackConfig) -> dict[str, Any]:
    """The full, deterministic shard plan: which key (and source reference) goes in which shard."""
    keyed: dict[str, str] = {}
    for ref in source.refs:
        key = _key_of(source, ref)
        if key in keyed:
            raise PackError(f"{source.root}: {keyed[key]!r} and {ref!r} map to the same key {key!r}; "
                            f"rename one of them")
        keyed[key] = ref
    ordered = sorted(keyed, key=lambda k: (_hash(k), k))
    sizes = split_sizes(len(ordered), cfg)
    _check_split_sizes(sizes, f"{len(ordered)} images in {source.describe()}")
    bounds = {"val": (0, sizes["val"]), "test": (sizes["val"], sizes["val"] + sizes["test"]),
              "train": (sizes["val"] + sizes["test"], len(ordered))}
    shards = []
    for split in SPLITS:
        keys = ordered[bounds[split][0]:bounds[split][1]]
        for index, start in enumerate(range(0, len(keys), cfg.shard_size)):
            chunk = keys[start:start + cfg.shard_size]
            shards.append({"name": f"{split}-{index:06d}.tar", "split": split, "keys": chunk,
                           "refs": [keyed[k] for k in chunk]})
    return {"format": 1, "source": source.describe(), "image_size": cfg.source_size,
            "jpeg_quality": cfg.jpeg_quality, "shard_size": cfg.shard_size,
            "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction, "shards": shards}


def _write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


def _prepare_out(out: Path, plan: dict[str, Any]) -> None:
    """Create `out` with `plan.json`, or accept it when it holds the same plan; never removes anything."""
    plan_path = out / PLAN
    if plan_path.is_file():
        try:
            old = json.loads(plan_path.read_text())
        except ValueError:
            raise PackError(f"{plan_path}: unreadable pack plan; choose another --out") from None
        differs = [k for k in plan if old.get(k) != plan[k]]
        if differs:
            what = ", ".join("shard plan" if k == "shards" else k for k in differs)
            raise PackError(f"{out} already holds a different pack ({what} differ); "
                            f"choose another --out or remove that folder yourself")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PackError(f"{out} exists and is not an empty folder nor an unfinished pack "
                        f"(no {PLAN}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(plan_path, plan)


class _Reader:
    """Reads one source's images by reference; opened once per shard (zip handles do not fork)."""

    def __init__(self, source: Source):
        self.source = source
        self.archive = zipfile.ZipFile(source.root) if source.kind == "zip" else None

    def name(self, ref: str) -> str:
        if self.source.kind == "synthetic":
            return f"synthetic:{ref}"
        if self.source.kind == "zip":
            return f"{self.source.root}:{ref}"
        return str(Path(self.source.root) / ref)

    def read(self, ref: str) -> bytes:
        """The file's bytes; PackError naming it when the file or zip member cannot be read."""
        try:
            if self.archive is not None:
                return self.archive.read(ref)
            return (Path(self.source.root) / ref).read_bytes()
        except ZIP_ERRORS as err:
            what = "damaged zip member" if self.archive is not None else "unreadable file"
            kind = "zlib.error" if isinstance(err, zlib.error) else type(err).__name__
            raise PackError(f"{self.name(ref)}: {what} ({kind}: {err})") from None

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()


def _encode(image: Image.Image, size: int, quality: int) -> bytes:
    buffer = io.BytesIO()
    square_frame(image, size).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _image_sample(reader: _Reader, ref: str, size: int, quality: int) -> tuple[bytes, tuple[int, int]]:
    """JPEG bytes of the `size` square for `ref`, and the source's upright (width, height)."""
    if reader.source.kind == "synthetic":
        return _encode(synthetic_face(int(ref)), size, quality), (256, 256)
    data = reader.read(ref)
    try:
        image = open_photo(data, reader.name(ref))  # decodes fully: bad files fail here, not in training
    except PhotoError as err:
        raise PackError(str(err)) from None
    if is_plain_frame(data, size):
        return data, image.size
    return _encode(image, size, quality), image.size


@dataclass(frozen=True)
class _Job:
    source: Source
    shard: dict[str, Any]
    out: str
    size: int
    quality: int
    skip_bad: bool


def _record_path(shard: Path) -> Path:
    return shard.with_name(f".{shard.name}.done.json")


def _sha256(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def _write_shard(job: _Job) -> str:
    """Write one shard to its temp name, then its record beside it (count, size, sha256, skipped
    files), and rename it when complete."""
    final = Path(job.out) / job.shard["name"]
    tmp = final.with_name(f".{final.name}.tmp")
    reader, skipped, count = _Reader(job.source), [], 0
    split = job.shard["split"]
    try:
        with open(tmp, "wb") as stream, TarWriter(stream, mtime=0.0) as writer:
            for key, ref in zip(job.shard["keys"], job.shard["refs"]):
                try:
                    jpg, original = _image_sample(reader, ref, job.size, job.quality)
                except PackError as err:
                    if not job.skip_bad:
                        raise PackError(f"{err}; fix or remove it, or pass --skip-bad") from None
                    skipped.append({"file": ref, "reason": str(err)})
                    continue
                meta = {"source": reader.name(ref) if job.source.kind == "synthetic" else ref,
                        "original_size": list(original), "split": split}
                writer.write({"__key__": key, "jpg": jpg, "json": json.dumps(meta).encode()})
                count += 1
    finally:
        reader.close()
    record = {"name": final.name, "split": split, "count": count, "size": tmp.stat().st_size,
              "sha256": _sha256(tmp), "skipped_files": skipped}
    _write_json_atomic(_record_path(final), record)
    tmp.replace(final)
    return final.name


def _read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (then nothing it says is trusted)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _expected_records(out: Path, plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What wrote each finished shard says it holds (count, size, sha256, skipped files): its entry in
    `manifest.json` (skipped files by the plan's refs), else its `.done.json`; shards with neither are absent."""
    manifest = _read_json(out / MANIFEST)
    records = {}
    if isinstance(manifest, dict) and isinstance(manifest.get("shards"), list):
        entries = {entry.get("name"): entry for entry in manifest["shards"] if isinstance(entry, dict)}
        skipped = manifest.get("skipped_files", [])
        for shard in plan["shards"]:
            if shard["name"] in entries:
                refs = set(shard["refs"])
                records[shard["name"]] = {**entries[shard["name"]],
                                          "skipped_files": [f for f in skipped if f.get("file") in refs]}
    for shard in plan["shards"]:
        record = _read_json(_record_path(out / shard["name"]))
        if shard["name"] not in records and isinstance(record, dict):
            records[shard["name"]] = record
    return records


def _verified_shards(out: Path, plan: dict[str, Any], say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The records of the finished shards whose size and sha256 match what wrote them; every other
    finished shard is named through `say` and will be re-packed from the source."""
    records = _expected_records(out, plan)
    good = {}
    for shard in plan["shards"]:
        path, record = out / shard["name"], records.get(shard["name"])
        if not path.is_file():
            continue
        if record is None:
            problem = f"no record of its sha256 (no {MANIFEST} entry nor {_record_path(path).name})"
        elif path.stat().st_size != record.get("size"):
            problem = f"{path.stat().st_size} bytes, {record.get('size')} written"
        elif _sha256(path) != record.get("sha256"):
            problem = "its sha256 differs from the one written"
        else:
            good[shard["name"]] = record
            continue
        say(f"{path}: {problem}; re-packing it from the source")
    return good


def _build_manifest(plan: dict[str, Any], source: Source, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    shards = [{key: records[s["name"]][key] for key in ("name", "split", "count", "size", "sha256")}
              for s in plan["shards"]]
    counts = {split: sum(s["count"] for s in shards if s["split"] == split) for split in SPLITS}
    skipped = [f for s in plan["shards"] for f in records[s["name"]]["skipped_files"]]
    _check_split_sizes(counts, f"the {sum(counts.values())} readable images of {plan['source']} "
                               f"({len(skipped)} skipped)")
    return {"format": 1, "version": hybridgan.__version__, "source": plan["source"],
            "image_size": plan["image_size"], "jpeg_quality": plan["jpeg_quality"],
            "counts": counts, "total": sum(counts.values()), "skipped": len(skipped),
            "skipped_files": skipped, "not_images": list(source.ignored), "shards": shards}


def _run_jobs(jobs: list[_Job], workers: int) -> Iterator[str]:
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_write_shard, jobs)
        return
    # fork: workers inherit the plan without pickling it again, and start in milliseconds.
    context = multiprocessing.get_context("fork")
    with context.Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(_write_shard, jobs)


def pack(source: str, out: Path, cfg: PackConfig, workers: int | None = None,
         skip_bad: bool = False, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Pack `source` into `out`: the manifest. Over an earlier pack of the same plan (finished or
    interrupted), every shard is verified and only the missing or damaged ones (named through `say`)
    are written again."""
    out = Path(out)
    src = _open_source(source)
    plan = make_plan(src, cfg)
    _prepare_out(out, plan)
    records = _verified_shards(out, plan, say)
    pending = [s for s in plan["shards"] if s["name"] not in records]
    if not pending and (out / MANIFEST).is_file():
        return json.loads((out / MANIFEST).read_text())
    jobs = [_Job(src, s, str(out), cfg.source_size, cfg.jpeg_quality, skip_bad) for s in pending]
    sizes = {s["name"]: len(s["keys"]) for s in pending}
    with tqdm(total=sum(sizes.values()), unit="img", desc=f"pack {out.name}", disable=None) as bar:
        for name in _run_jobs(jobs, workers if workers is not None else cfg.workers):
            bar.update(sizes[name])
            records[name] = _read_json(_record_path(out / name))
    manifest = _build_manifest(plan, src, records)
    _write_json_atomic(out / MANIFEST, manifest)
    for shard in plan["shards"]:
        _record_path(out / shard["name"]).unlink(missing_ok=True)
    return manifest


def _names(files: list[str]) -> str:
    shown = ", ".join(files[:SHOWN_NAMES])
    more = len(files) - SHOWN_NAMES
    return shown + (f" and {more} more (all in {MANIFEST})" if more > 0 else "")


def summary_lines(manifest: dict[str, Any], out: Path, seconds: float) -> list[str]:
    """What `main` prints after a pack: the counts, then every skipped and ignored file by name."""
    counts = manifest["counts"]
    lines = [f"packed {manifest['total']} images into {out} in {seconds:.1f} s: train {counts['train']}, "
             f"val {counts['val']}, test {counts['test']}, skipped {manifest['skipped']}, "
             f"not images {len(manifest.get('not_images', []))}"]
    skipped = manifest.get("skipped_files", [])
    if skipped:
        lines.append(f"skipped {len(skipped)} unreadable: {_names([s['file'] for s in skipped])}")
    if manifest.get("not_images"):
        lines.append(f"ignored {len(manifest['not_images'])} files that are not images: "
                     f"{_names(manifest['not_images'])}")
    return lines


def _verify(shards_dir: Path) -> int:
    """`--verify`: re-hash every shard; one line per mismatch, exit 1 when any."""
    start = time.perf_counter()
    try:
        problems, checked, size = verify_shards(shards_dir)
    except ManifestError as err:
        print(f"verify error: {err}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"verify error: {problem}", file=sys.stderr)
    status = f"{len(problems)} of {checked} shards do not match" if problems else f"all {checked} shards match"
    print(f"verified {shards_dir}: {status} {MANIFEST} ({size / 1e6:.0f} MB in {time.perf_counter() - start:.1f} s)")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser("hybridgan.pack", __doc__.splitlines()[0], [
        "python -m hybridgan.pack /data/celeba-hq.zip --out shards/celeba-hq --config configs/paper.yaml",
        "python -m hybridgan.pack synthetic:2000 --out shards/synthetic",
        "python -m hybridgan.pack --verify shards/celeba-hq"])
    parser.add_argument("source", nargs="?", help="folder of images, a .zip of one, or synthetic:N")
    parser.add_argument("--out", type=Path, help="output folder (default: the config's data.shards)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default pack.workers)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable images and damaged zip members, list them in the manifest")
    parser.add_argument("--verify", type=Path, metavar="DIR",
                        help="check every shard of the pack in DIR against its manifest (size, sha256)")
    add_config_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    if args.verify is not None:
        if args.source or args.out:
            parser.error("--verify DIR takes no SOURCE or --out")
        return _verify(args.verify)
    cfg = config_from_args(args)
    if not args.source:
        parser.error("SOURCE is required (or --verify DIR)")
    out = args.out or Path(cfg.data.shards)
    start = time.perf_counter()
    try:
        manifest = pack(args.source, out, cfg.pack, workers=args.workers, skip_bad=args.skip_bad)
    except PackError as err:
        print(f"pack error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(manifest, out, time.perf_counter() - start)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
