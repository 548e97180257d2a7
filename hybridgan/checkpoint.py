"""Checkpoints of a training stage: the one place that knows file names, atomicity and "latest".

Layout inside a stage folder::

    checkpoints/step-00000120/                accelerator.save_state(): models, optimizers, RNG, TrainState
    checkpoints/step-00000120/manifest.json   name, size and sha256 of every file above, and what the
                                              session saved it with (world size, per-rank batch)
    checkpoints/latest                        the name of the newest checkpoint (temp + rename)
    checkpoints/damaged-step-00000090/        a checkpoint that failed its manifest, moved aside

A checkpoint is written into `checkpoints/.partial-step-N/`; once every rank has written its part
the main process writes `manifest.json` and renames the folder, then replaces `latest`. A kill at
any moment therefore leaves complete `step-*` folders only (a stale `.partial-*` is removed on the
next save). On resume, the newest `step-*` whose files match their manifest is used, whatever
`latest` says (missing, dangling or older); a damaged one is named and moved aside, never deleted.
Files follow the user's umask (safetensors and tempfile write mode 0600 on their own).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from accelerate import Accelerator

from hybridgan.atomic import write_text_atomic

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint although the stage has some; the message names them."""


class CheckpointManager:
    """Save, find, verify and prune the checkpoints of one stage folder."""

    def __init__(self, accelerator: Accelerator, stage_dir: Path, keep: int) -> None:
        self.accelerator = accelerator
        self.dir = stage_dir / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        """The newest checkpoint by name (unverified), or None when the stage has none yet."""
        done = self._complete()
        return done[-1] if done else None

    def find_resume_point(self, say: Callable[[str], None]) -> Path | None:
        """The newest checkpoint whose files match its manifest (main process only).

        Damaged ones are moved to `damaged-step-N/` and named through `say`; a missing or dangling
        `latest` is named and rewritten. Raises CheckpointError when checkpoints exist but none is
        intact; returns None when the stage has none.
        """
        candidates = self._complete()
        pointer = self.dir / "latest"
        named = pointer.read_text().strip() if pointer.is_file() else None
        if candidates and named != candidates[-1].name:
            state = "missing" if named is None else f"names {named}, which is not the newest checkpoint"
            say(f"{pointer}: {state}; looking for the newest intact step-* checkpoint")
        damaged = []
        for path in reversed(candidates):
            problem = verify_manifest(path)
            if problem is None:
                if named != path.name:
                    self._point_latest_to(path)
                return path
            aside = path.with_name(f"damaged-{path.name}")
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(path, aside)
            damaged.append(aside.name)
            say(f"{path}: damaged ({problem}); moved to {aside.name}")
        if damaged:
            raise CheckpointError(f"{self.dir}: no intact checkpoint left ({', '.join(damaged)} are damaged and "
                                  f"kept); move the stage folder away to start it again")
        return None

    def save(self, step: int, saved_with: dict[str, Any]) -> Path:
        """Write the accelerator's whole state as checkpoint `step` on every rank, with `saved_with`
        (JSON values) in its manifest; returns its path."""
        final = self.dir / f"step-{step:08d}"
        partial = self.dir / f".partial-step-{step:08d}"
        acc = self.accelerator
        if acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".partial-*"):
                shutil.rmtree(stale)
        acc.wait_for_everyone()
        acc.save_state(str(partial))
        acc.wait_for_everyone()
        if acc.is_main_process:
            follow_umask(partial)
            write_manifest(partial, saved_with)
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            self._point_latest_to(final)
            self._prune(final)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> None:
        """Restore models, optimizers, RNG states and registered objects from `path`."""
        self.accelerator.load_state(str(path))

    def saved_with(self, path: Path) -> dict[str, Any]:
        """What checkpoint `path` was saved with (`save`'s argument); {} for one without a manifest."""
        manifest = path / MANIFEST
        return json.loads(manifest.read_text()).get("saved_with", {}) if manifest.is_file() else {}

    def _complete(self) -> list[Path]:
        """`step-*` folders, oldest first (each renamed into place only once complete)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("step-*") if p.is_dir())

    def _point_latest_to(self, path: Path) -> None:
        write_text_atomic(self.dir / "latest", path.name)

    def _prune(self, newest: Path) -> None:
        done = self._complete()
        for old in done[: max(0, len(done) - self.keep)]:
            if old != newest:
                shutil.rmtree(old)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, saved_with: dict[str, Any]) -> None:
    """`folder/manifest.json`: relative name, size and sha256 of every file under `folder`, and
    `saved_with`."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = [{"name": str(p.relative_to(folder)), "size": p.stat().st_size, "sha256": _sha256(p)} for p in files]
    target = folder / MANIFEST
    target.write_text(json.dumps({"files": entries, "saved_with": saved_with}, indent=1))
    follow_umask(target)


def verify_manifest(folder: Path) -> str | None:
    """None when every file listed in `folder`'s manifest is there with its size and sha256, else
    what is wrong. A checkpoint from before manifests were written is taken as it is."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as err:
        return f"{MANIFEST} unreadable: {err}"
    for entry in entries:
        path = folder / entry["name"]
        if not path.is_file():
            return f"{entry['name']} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{entry['name']} has {size} bytes, {entry['size']} expected"
    for entry in entries:
        if _sha256(folder / entry["name"]) != entry["sha256"]:
            return f"{entry['name']} does not match its sha256"
    return None


def follow_umask(path: Path) -> None:
    """Give `path` (a file, or a folder and everything under it) the modes a plain `open`/`mkdir`
    would under the current umask: safetensors and tempfile create their files with mode 0600."""
    mask = os.umask(0)
    os.umask(mask)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)
