"""Checkpoints of a training stage: the one place that knows file names, atomicity and "latest".

Layout inside a stage folder::

    checkpoints/step-00000120/   accelerator.save_state(): models, optimizers, scaler, RNG, TrainState
    checkpoints/latest           the name of the newest complete checkpoint (written by temp + rename)

A checkpoint is written into `checkpoints/.partial-step-N/` and renamed once every rank has written
its part, then `latest` is replaced. A kill at any moment therefore leaves either the previous
`latest` or the new one, both complete; a stale `.partial-*` folder is removed on the next save.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from accelerate import Accelerator


class CheckpointManager:
    """Save, find and prune the checkpoints of one stage folder."""

    def __init__(self, accelerator: Accelerator, stage_dir: Path, keep: int) -> None:
        self.accelerator = accelerator
        self.dir = stage_dir / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when the stage has none yet."""
        pointer = self.dir / "latest"
        if not pointer.is_file():
            return None
        path = self.dir / pointer.read_text().strip()
        if not path.is_dir():
            raise FileNotFoundError(f"{pointer}: names {path.name}, which does not exist")
        return path

    def save(self, step: int) -> Path:
        """Write the accelerator's whole state as checkpoint `step` on every rank; returns its path."""
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
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            tmp = self.dir / "latest.tmp"
            tmp.write_text(final.name)
            os.replace(tmp, self.dir / "latest")
            self._prune(final)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> None:
        """Restore models, optimizers, RNG states and registered objects from `path`."""
        self.accelerator.load_state(str(path))

    def _prune(self, newest: Path) -> None:
        done = sorted(p for p in self.dir.glob("step-*") if p.is_dir())
        for old in done[: max(0, len(done) - self.keep)]:
            if old != newest:
                shutil.rmtree(old)
