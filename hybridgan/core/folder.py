"""A stage's folder `runs/<name>/<stage>/`: its lock, the config rules of a resume, `launches.jsonl`."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hybridgan.atomic import write_text_atomic
from hybridgan.checkpoint import any_rank
from hybridgan.config import Config, save_config, to_yaml
from hybridgan.core.errors import TrainingError
from hybridgan.lock import StageBusyError, StageLock
from hybridgan.tracking import append_record, set_aside_torn_line

RESCHEDULABLE = ("log_every", "checkpoint_every", "checkpoint_every_minutes", "checkpoint_async", "eval_every",
                 "eval_every_minutes", "eval_batches", "keep_checkpoints", "compile", "channels_last", "cpu")
"""Stage keys that a resume may change: they schedule the run without changing what it computes."""

RESCHEDULABLE_DATA = ("data.workers", "data.resident")
"""Data keys that a resume may change: how the same batches are made, not which."""

ONE_RUN = ("run.restart_damaged", "discriminator.min_pretrain_accuracy", "tracking.backends")
"""Keys that instruct one run rather than describe the experiment: never compared on resume."""

LENGTHS = ("epochs", "max_steps")
"""Stage keys that a resume may raise (a longer run), never lower."""


class StageFolder:
    """The folder of one stage (`stage_key`: "pretrain" or "train") for the session's life: `open`
    takes its lock and checks its config, `pin_config` writes the config with the first checkpoint,
    `record_launch` appends to `launches.jsonl`, `release` gives the lock back."""

    def __init__(self, path: Path, cfg: Config, stage_key: str, accelerator: Accelerator) -> None:
        self.path = path
        self.cfg = cfg
        self.stage_key = stage_key
        self.accelerator = accelerator
        self._lock = StageLock(path)
        self._config_pending = False  # the main process writes config.yaml with the first checkpoint

    def open(self) -> None:
        """Lock the folder and check its config (`check_config`); the lock is released again when
        the config is refused."""
        self._take_lock()
        try:
            self.check_config()
        except TrainingError:
            self.release()
            raise

    def release(self) -> None:
        self._lock.release()

    def _take_lock(self) -> None:
        """The main process takes the stage folder's lock for the session's life; every rank stops
        with one line when it cannot (busy folder, or a folder it may not write)."""
        problem = None
        if self.accelerator.is_main_process:
            try:
                self._lock.acquire()
            except StageBusyError as err:
                problem = str(err)
            except OSError as err:
                problem = f"{err.filename or self.path}: cannot write the run folder ({err.strerror})"
        if any_rank(self.accelerator, problem is not None)[0]:
            raise TrainingError(problem or f"{self.path}: the main process could not take this stage folder")

    def check_config(self) -> None:
        """Every rank compares with the folder's config (so that all of them stop on a mismatch;
        the other stage's and evaluation's settings do not count). Keys that change the experiment
        are refused by name; scheduling keys (`RESCHEDULABLE`, `RESCHEDULABLE_DATA`) and a longer run
        (`LENGTHS` raised) are accepted, printed once and written into the folder's config. When the
        folder has none, the main process writes it with the first checkpoint (`pin_config`): a
        stage that fails before that (a wrong path, a bad batch) leaves no config that would refuse
        the corrected command. A key the folder's config lacks (it was written by a version without
        that key) reads as the key's default, which is what that version did."""
        path = self.path / "config.yaml"
        if not path.is_file():
            self._config_pending = self.accelerator.is_main_process
            return
        old = read_run_config(path)
        new = OmegaConf.create(to_yaml(self.cfg))
        other_stages = ("eval.", "train." if self.stage_key == "pretrain" else "pretrain.", *ONE_RUN)
        changed = [key for key in changed_keys(OmegaConf.to_container(old), OmegaConf.to_container(new))
                   if not key.startswith(other_stages)]
        accepted = [key for key in changed if self._may_change_on_resume(key, OmegaConf.select(old, key),
                                                                          OmegaConf.select(new, key))]
        refused = [key + (" (may only be raised)" if key.split(".")[-1] in LENGTHS else "")
                   for key in changed if key not in accepted]
        if refused:
            raise TrainingError(
                f"{path}: this run folder was started with a different config ({', '.join(refused)}); "
                f"resume with the same settings or choose another run.name")
        if not accepted:
            return
        self.accelerator.print(f"{path}: accepted on resume: " + ", ".join(
            f"{key} {OmegaConf.select(old, key)} -> {OmegaConf.select(new, key)}" for key in accepted))
        if self.accelerator.is_main_process:
            for key in accepted:
                OmegaConf.update(old, key, OmegaConf.select(new, key))
            write_text_atomic(path, OmegaConf.to_yaml(old))

    def _may_change_on_resume(self, key: str, old: Any, new: Any) -> bool:
        """Whether `key` may go from `old` to `new` on resume (see `check_config`)."""
        stage, _, name = key.partition(".")
        if key in RESCHEDULABLE_DATA or (stage == self.stage_key and name in RESCHEDULABLE):
            return True
        if stage != self.stage_key or name not in LENGTHS:
            return False
        if name == "max_steps":  # 0: no limit but epochs
            return new == 0 or (old != 0 and new > old)
        return new > old

    def pin_config(self) -> None:
        """Write the config, once, when the folder had none (main process; see `check_config`)."""
        if self._config_pending:
            save_config(self.cfg, self.path / "config.yaml")
            self._config_pending = False

    def record_launch(self, **how: Any) -> None:
        """Append the time, the host, the accelerator's world size, distributed type, device and mixed
        precision, and `how` this (re)start ran to `launches.jsonl` (main process)."""
        acc = self.accelerator
        if not acc.is_main_process:
            return
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(),
                  "world_size": acc.num_processes, "distributed_type": str(acc.distributed_type),
                  "device": str(acc.device), "mixed_precision": acc.mixed_precision, **how}
        set_aside_torn_line(self.path / "launches.jsonl", acc.print)
        append_record(self.path / "launches.jsonl", record)


def read_run_config(path: Path) -> DictConfig:
    """A run folder's `config.yaml` over the schema's defaults; TrainingError naming the file when it
    is not YAML or not a mapping of the schema's keys."""
    try:
        saved = OmegaConf.create(path.read_text())
        if not isinstance(saved, DictConfig):
            raise ValueError(f"holds a {type(saved).__name__.removesuffix('Config').lower()}, not a mapping of keys")
        return OmegaConf.merge(OmegaConf.create(to_yaml(Config())), saved)
    except (ValueError, OmegaConfBaseException, yaml.YAMLError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingError(f"{path}: not a readable run config ({reason}); restore it, or move the run folder "
                            f"away to start it again") from None


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]
