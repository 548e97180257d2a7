"""Reading a packed dataset: `manifest.json` (written last by `hybridgan.pack`) and its shard list.

The manifest holds `counts` per split, `shards` (one entry per tar: `name`, `split`, `count`,
`sha256`), `image_size`, `source`, `version` and `skipped`. A folder without it holds no finished pack.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A missing, unfinished or inconsistent pack; the message names the folder or file."""


def _hint(shards_dir: Path) -> str:
    return f"run `python -m hybridgan.pack SOURCE --out {shards_dir}` (re-running finishes an interrupted pack)"


def read_manifest(shards_dir: str | Path) -> dict[str, Any]:
    """The manifest of the pack in `shards_dir`; ManifestError when it is missing or a shard is absent."""
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise ManifestError(f"shards folder {shards_dir} not found: {_hint(shards_dir)}")
    path = shards_dir / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{shards_dir} holds no finished pack (no {MANIFEST}): {_hint(shards_dir)}")
    try:
        manifest = json.loads(path.read_text())
        shards = manifest["shards"]
        manifest["counts"]
    except (ValueError, KeyError, TypeError) as err:
        raise ManifestError(f"{path}: not a valid pack manifest ({err}): {_hint(shards_dir)}") from None
    for shard in shards:
        if not (shards_dir / shard["name"]).is_file():
            raise ManifestError(f"{shards_dir / shard['name']}: shard listed in {path} is missing: "
                                f"{_hint(shards_dir)}")
    return manifest


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ManifestError(f"split {split!r} is not one of {', '.join(SPLITS)}")


def shard_entries(shards_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """The manifest entries (`name`, `count`, `sha256`) of `split`'s shards, in pack order."""
    _check_split(split)
    entries = [s for s in read_manifest(shards_dir)["shards"] if s["split"] == split]
    if not entries:
        raise ManifestError(f"{shards_dir}: the pack has no {split} shards (pack.{split}_fraction=0?)")
    return entries


def shard_urls(shards_dir: str | Path, split: str) -> list[str]:
    """Paths of `split`'s shard files, in pack order."""
    return [str(Path(shards_dir) / s["name"]) for s in shard_entries(shards_dir, split)]


def split_count(shards_dir: str | Path, split: str) -> int:
    """The number of samples in `split`."""
    _check_split(split)
    return int(read_manifest(shards_dir)["counts"].get(split, 0))
