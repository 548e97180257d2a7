"""Reading a packed dataset: `manifest.json` (written last by `hybridgan.pack`) and its shard list.

The manifest holds `counts` per split, `shards` (one entry per tar: `name`, `split`, `count`, `size`
in bytes, `sha256`), `image_size`, `source`, `version`, `skipped` (a count), `skipped_files` (file and
reason) and `not_images`. A folder without it holds no finished pack.

Verification: `shard_entries`, which every reading stage calls before it reads a split, checks
each of the split's shards against the manifest, once per process per file version:

- its size (a `stat`, free): a truncated or replaced shard is refused before the first step;
- its sha256, read in full (about 2 GB/s of hashing plus the read; 0.2-0.5 s for CelebA-HQ's
  420 MB when the files are in the page cache). The result is memoised in the process by
  (path, size, mtime), so the loader's per-epoch calls hash nothing again. Nothing is written next
  to the shards: a pack is often on a read-only or shared file system, and a cache file there
  could not be trusted by another user anyway; a new process hashes again, which costs seconds.

A mismatch is one `ManifestError` line naming the shard, the expected and the actual value.
`verify_shards` (`python -m hybridgan.pack --verify DIR`) checks every shard of every split.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A missing, unfinished or inconsistent pack; the message names the folder or file."""


def _hint(shards_dir: Path) -> str:
    return (f"run `python -m hybridgan.pack SOURCE --out {shards_dir}` (a re-run verifies every shard and re-packs "
            f"the missing and damaged ones)")


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


_verified: dict[tuple[str, int, int], str] = {}
"""sha256 of shard files already hashed by this process, by (path, size, mtime_ns)."""


def _file_sha256(path: Path, stat: os.stat_result) -> str:
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        with open(path, "rb") as stream:
            _verified[key] = hashlib.file_digest(stream, "sha256").hexdigest()
    return _verified[key]


def shard_mismatch(shards_dir: str | Path, entry: dict[str, Any], check_hash: bool = True) -> str | None:
    """Why the shard of manifest `entry` does not match it (size, then sha256), or None when it does."""
    path = Path(shards_dir) / entry["name"]
    try:
        stat = path.stat()
    except OSError as err:
        return f"{path}: cannot be read ({err.strerror})"
    expected_size = entry.get("size")
    if expected_size is not None and stat.st_size != expected_size:
        return (f"{path}: {stat.st_size} bytes, the manifest says {expected_size} "
                f"(truncated or replaced); re-pack or restore it")
    if not check_hash:
        return None
    try:
        actual = _file_sha256(path, stat)
    except OSError as err:
        return f"{path}: cannot be read ({err.strerror})"
    if actual != entry["sha256"]:
        return (f"{path}: sha256 {actual}, the manifest says {entry['sha256']} "
                f"(the shard or the manifest changed since packing); re-pack or restore it")
    return None


def verify_shards(shards_dir: str | Path) -> tuple[list[str], int, int]:
    """Every shard of the pack checked afresh: (one line per mismatch, shards checked, bytes checked)."""
    entries = read_manifest(shards_dir)["shards"]
    _verified.clear()
    problems = [p for p in (shard_mismatch(shards_dir, e) for e in entries) if p is not None]
    size = sum((Path(shards_dir) / e["name"]).stat().st_size for e in entries
               if (Path(shards_dir) / e["name"]).is_file())
    return problems, len(entries), size


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ManifestError(f"split {split!r} is not one of {', '.join(SPLITS)}")


def shard_entries(shards_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """The manifest entries (`name`, `count`, `size`, `sha256`) of `split`'s shards, in pack order.

    Each shard is checked against its entry first (size, then sha256 memoised per process): a
    mismatch is a ManifestError naming the shard, before anything reads it.
    """
    _check_split(split)
    entries = [s for s in read_manifest(shards_dir)["shards"] if s["split"] == split]
    if not entries:
        raise ManifestError(f"{shards_dir}: the pack has no {split} shards (pack.{split}_fraction=0?)")
    for check_hash in (False, True):  # every size (free) before any hash
        for entry in entries:
            problem = shard_mismatch(shards_dir, entry, check_hash)
            if problem is not None:
                raise ManifestError(problem)
    return entries


def shard_urls(shards_dir: str | Path, split: str) -> list[str]:
    """Paths of `split`'s shard files, in pack order."""
    return [str(Path(shards_dir) / s["name"]) for s in shard_entries(shards_dir, split)]

