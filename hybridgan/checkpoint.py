"""Checkpoints of a training stage: the one place that knows file names, atomicity and "latest".

Layout inside a stage folder::

    checkpoints/step-00000120/                the files of accelerator.save_state(): models, optimizers, RNG, TrainState
    checkpoints/step-00000120/manifest.json   name, size and sha256 of every file above, and what the
                                              session saved it with (world size, per-rank batch)
    checkpoints/latest                        the name of the newest checkpoint (temp + rename)
    checkpoints/damaged-step-00000090/        a checkpoint that failed its manifest, moved aside

A checkpoint is written into `checkpoints/.partial-step-N/`; once every rank has written its part
the main process writes `manifest.json` and renames the folder, then replaces `latest`. A kill at
any moment therefore leaves complete `step-*` folders only (a stale `.partial-*` is removed on the
next save). On resume, the newest `step-*` whose files match their manifest is used, whatever
`latest` says (missing, dangling or older); a damaged one (a file that differs from the manifest,
or no manifest at all) is named and moved aside, never deleted. When no intact one is left, the
stage is an error on this and every later run, as long as `damaged-*` folders remain, until the
user passes `run.restart_damaged=true` (start the stage again from step 0; the damaged ones stay).
Files follow the user's umask (safetensors and tempfile write mode 0600 on their own).

By default (`checkpoint_async`) the step does not wait for the big files: the main thread takes a
snapshot (model and optimizer state dicts copied to host memory; RNG states, scaler and registered
objects written at once, on every rank, with Accelerate's own `save_accelerator_state` and
`save_custom_state`), and a background thread of the main process writes the weights and optimizer
states under the names `Accelerator.load_state` expects, then the manifest, the rename, `latest`
and the pruning. At most one save is in flight: the next save, `wait` (the session's close) and a
resume wait for it. The background thread never runs a collective: every barrier is in the main
thread. DeepSpeed engines save through their own collective `save_checkpoint`, so under DeepSpeed
(and with `checkpoint_async: false`) the whole save runs in the main thread with `save_state`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.checkpointing import save_accelerator_state, save_custom_state
from accelerate.utils import OPTIMIZER_NAME, SAFE_WEIGHTS_NAME, DistributedType, save
from accelerate.utils.other import clean_state_dict_for_safetensors

from hybridgan.atomic import write_text_atomic

MANIFEST = "manifest.json"

SNAPSHOT_TYPES = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
"""Where every rank holds whole replicated models, so the main process's host copy is the checkpoint
(DDP, one process); DeepSpeed, FSDP and the rest save through their own collectives, synchronously."""


class CheckpointError(RuntimeError):
    """No usable checkpoint although the stage has some; the message names them."""


class CheckpointManager:
    """Save, find, verify and prune the checkpoints of one stage folder."""

    def __init__(self, accelerator: Accelerator, stage_dir: Path, keep: int, background: bool = True) -> None:
        self.accelerator = accelerator
        self.dir = stage_dir / "checkpoints"
        self.keep = keep
        self.background = background and accelerator.distributed_type in SNAPSHOT_TYPES
        self._writer: threading.Thread | None = None
        self._failure: str | None = None

    def latest(self) -> Path | None:
        """The newest checkpoint by name (unverified), or None when the stage has none yet."""
        done = self._complete()
        return done[-1] if done else None

    def find_resume_point(self, say: Callable[[str], None], restart_damaged: bool = False) -> Path | None:
        """The newest checkpoint whose files match its manifest (main process only).

        Damaged ones are moved to `damaged-step-N/` and named through `say`; a missing or dangling
        `latest` is named and rewritten. Raises CheckpointError when none is intact but damaged ones
        exist (moved aside now or by an earlier run), unless `restart_damaged`, or when the write in
        flight failed; returns None when the stage has no checkpoint to resume from.
        """
        self.wait()
        candidates = self._complete()
        pointer = self.dir / "latest"
        named = pointer.read_text().strip() if pointer.is_file() else None
        if candidates and named != candidates[-1].name:
            state = "missing" if named is None else f"names {named}, which is not the newest checkpoint"
            say(f"{pointer}: {state}; looking for the newest intact step-* checkpoint")
        for path in reversed(candidates):
            problem = verify_manifest(path)
            if problem is None:
                if named != path.name:
                    self._point_latest_to(path)
                return path
            aside = _free_name(path.with_name(f"damaged-{path.name}"))
            os.replace(path, aside)
            say(f"{path}: damaged ({problem}); moved to {aside.name}")
        damaged = ", ".join(sorted(p.name for p in self.dir.glob("damaged-*"))) if self.dir.is_dir() else ""
        if damaged and not restart_damaged:
            raise CheckpointError(f"{self.dir}: no intact checkpoint left ({damaged} are damaged and kept); "
                                  f"restore one, or pass run.restart_damaged=true to start the stage again "
                                  f"from step 0")
        if damaged:
            say(f"{self.dir}: no intact checkpoint ({damaged} are damaged and kept); run.restart_damaged=true: "
                f"starting the stage again from step 0")
        return None

    def save(self, step: int, saved_with: dict[str, Any]) -> Path:
        """Write the accelerator's whole state as checkpoint `step` on every rank, with `saved_with`
        (JSON values) in its manifest; returns its path (all ranks must call it).

        With `background`, it returns once the snapshot is taken and the main process's writer
        thread has the rest; the checkpoint is complete when `wait` returns. Raises CheckpointError
        on every rank when the previous background write failed.
        """
        final = self.dir / f"step-{step:08d}"
        partial = self.dir / f".partial-step-{step:08d}"
        acc = self.accelerator
        problem = None
        try:
            self.wait()
        except CheckpointError as err:
            problem = str(err)
        if any_rank(acc, problem is not None)[0]:
            raise CheckpointError(problem or f"{self.dir}: the main process could not write its last checkpoint")
        if acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".partial-*"):
                shutil.rmtree(stale)
        acc.wait_for_everyone()
        umask = current_umask()  # read in the main thread: reading it sets it for a moment
        if self.background:
            snapshot = take_snapshot(acc, partial)
            acc.wait_for_everyone()  # every rank's RNG states are in `partial`
            if acc.is_main_process:
                self._writer = threading.Thread(target=self._write_in_background, name=f"checkpoint {final.name}",
                                                args=(snapshot, partial, final, saved_with, umask))
                self._writer.start()
            return final
        acc.save_state(str(partial))
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._publish(partial, final, saved_with, umask)
        acc.wait_for_everyone()
        return final

    def wait(self) -> None:
        """Block until the background write in flight (if any) is done; raise CheckpointError (one
        line naming the folder) when it failed. The previous checkpoint is then still `latest`."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        failure, self._failure = self._failure, None
        if failure is not None:
            raise CheckpointError(failure)

    def _write_in_background(self, snapshot: Snapshot, partial: Path, final: Path, saved_with: dict[str, Any],
                             umask: int) -> None:
        try:
            write_snapshot(snapshot, partial)
            self._publish(partial, final, saved_with, umask)
        except Exception as err:  # handed to the main thread at its next wait
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self._failure = (f"{partial}: writing the checkpoint failed ({reason}); the previous checkpoint "
                             f"stays the latest")

    def _publish(self, partial: Path, final: Path, saved_with: dict[str, Any], umask: int) -> None:
        """Main process, once every file of `partial` is written: manifest, modes, rename, `latest`, prune."""
        write_manifest(partial, saved_with)
        follow_umask(partial, umask)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        self._point_latest_to(final)
        self._prune(final)

    def load(self, path: Path) -> None:
        """Restore models, optimizers, RNG states and registered objects from `path` (after any
        write in flight)."""
        self.wait()
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


@dataclass
class Snapshot:
    """Host copies of the main process's model and optimizer state dicts, in the accelerator's order."""

    models: list[dict[str, Any]]
    optimizers: list[dict[str, Any]]


def host_copy(value: Any) -> Any:
    """`value` (nested dicts, lists and tuples of tensors and plain values) with every tensor copied
    to host memory, so that later steps cannot change it."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return type(value)((key, host_copy(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(item) for item in value)
    return value


def take_snapshot(acc: Accelerator, folder: Path) -> Snapshot | None:
    """What `Accelerator.save_state` would write, at this moment, on every rank: the small files
    (RNG states of this rank, scaler, schedulers, samplers, registered objects) are written into
    `folder` now by Accelerate itself; the main process returns host copies of the model and
    optimizer states for `write_snapshot` (other ranks return None: they write no weights).

    Accelerate keeps the prepared objects in private lists, read here as `save_state` reads them;
    `save_state`'s model pre-hooks (`register_save_state_pre_hook`, unused here) are not called."""
    folder.mkdir(parents=True, exist_ok=True)
    on_each_node = acc.project_configuration.save_on_each_node
    save_accelerator_state(str(folder), [], [], acc._schedulers, acc._dataloaders, acc.process_index, acc.step,
                           acc.scaler, save_on_each_node=on_each_node)
    for index, obj in enumerate(acc._custom_objects):
        save_custom_state(obj, str(folder), index, save_on_each_node=on_each_node)
    if not acc.is_main_process:
        return None
    models = [host_copy(clean_state_dict_for_safetensors(acc.get_state_dict(model, unwrap=False)))
              for model in acc._models]
    return Snapshot(models, [host_copy(optimizer.state_dict()) for optimizer in acc._optimizers])


def write_snapshot(snapshot: Snapshot, folder: Path) -> None:
    """The snapshot's weights and optimizer states in `folder`, under the names (and with the
    serialisation) of Accelerate's `save_accelerator_state`, which `load_state` reads back."""
    for index, state in enumerate(snapshot.models):
        name = SAFE_WEIGHTS_NAME if index == 0 else SAFE_WEIGHTS_NAME.replace(".", f"_{index}.")
        save(state, folder / name, safe_serialization=True)
    for index, state in enumerate(snapshot.optimizers):
        name = f"{OPTIMIZER_NAME}.bin" if index == 0 else f"{OPTIMIZER_NAME}_{index}.bin"
        save(state, folder / name, safe_serialization=False)


def any_rank(acc: Accelerator, *flags: bool) -> tuple[bool, ...]:
    """Each flag or-ed over all ranks, in one all-reduce (every rank must call it at the same point)."""
    if acc.num_processes == 1:
        return flags
    totals = acc.reduce(torch.tensor([float(flag) for flag in flags], device=acc.device), reduction="sum")
    return tuple(bool(total > 0) for total in totals.tolist())


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
    (folder / MANIFEST).write_text(json.dumps({"files": entries, "saved_with": saved_with}, indent=1))


def _free_name(path: Path) -> Path:
    """`path`, or `path-2`, `path-3` ... whichever does not exist yet (nothing is overwritten)."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


def verify_manifest(folder: Path) -> str | None:
    """None when every file listed in `folder`'s manifest is there with its size and sha256, else
    what is wrong; a folder without its manifest cannot be verified, so it is damaged too."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{MANIFEST} is missing"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
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


def current_umask() -> int:
    """The process's umask (reading it means setting it for a moment: call it from the main thread)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: Path, mask: int | None = None) -> None:
    """Give `path` (a file, or a folder and everything under it) the modes a plain `open`/`mkdir`
    would under umask `mask` (default: the current one): safetensors and tempfile create their
    files with mode 0600."""
    mask = current_umask() if mask is None else mask
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)
