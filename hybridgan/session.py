"""The training core shared by `pretrain` and `train`: everything a loop needs that is not the model.

A `TrainingSession` owns, for one stage folder `runs/<name>/<stage>/`:
- the Accelerator (CPU, one or many GPUs, many nodes, DeepSpeed: whatever `accelerate launch` set up;
  `mixed_precision` from the stage config),
- the stage folder's lock (`hybridgan.lock`): a second process on a busy folder is refused at once,
- the resolved config (`config.yaml`, written with the first checkpoint, so that a stage that fails
  before it pins nothing; a re-run that changes the experiment is refused, naming the keys;
  scheduling settings and a longer run are accepted and written back),
- the global batch: `batch_size` images per optimiser step on any world size, `batch_size_per_rank`
  on each rank,
- resume: re-running the same command loads the newest intact checkpoint and continues from its
  step, on the same or another world size,
- checkpoints every `checkpoint_every` steps or `checkpoint_every_minutes` (and on SIGTERM/SIGUSR1/
  SIGINT, then exit code 75 so that a scheduler requeues and the re-run resumes), keeping the last
  `keep_checkpoints`, written in the background (`checkpoint_async`, `hybridgan.checkpoint`),
- evaluation every `eval_every` steps or `eval_every_minutes`,
- the NaN guard: a non-finite loss, gradient norm, weight or buffer (BatchNorm's running statistics)
  stops the run with one line naming the step and the value, before any checkpoint or export of it,
  and the last good checkpoint stays the latest,
- rank-0-only metrics (`metrics.jsonl`, TensorBoard) and the progress bar.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

if not torch.cuda.is_available():
    # DeepSpeed would otherwise probe for an accelerator and log "Setting accelerator to CPU" from
    # every rank, in the middle of the progress bar
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from accelerate import Accelerator
from accelerate.utils import (DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs, broadcast_object_list,
                              set_seed)
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.auto import tqdm

from hybridgan.atomic import write_text_atomic
from hybridgan.checkpoint import CheckpointError, CheckpointManager, any_rank
from hybridgan.config import (Config, StageConfig, add_config_arguments, cli_parser, config_from_args, save_config,
                              scaled_lr, to_yaml)
from hybridgan.devices import resolve_mixed_precision, use_channels_last
from hybridgan.exports import non_finite
from hybridgan.host_memory import keep_freed_memory
from hybridgan.lock import StageBusyError, StageLock
from hybridgan.tracking import MetricsLogger, append_record, set_aside_torn_line

EXIT_REQUEUE = 75
"""Exit code after a signal-triggered checkpoint (EX_TEMPFAIL): not done, re-run to resume."""

MIN_BATCH_PER_RANK = 2
"""BatchNorm in training mode needs two images per rank (the generator's 1x1 bottleneck fails on one)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""Signals that checkpoint the current step and exit with EXIT_REQUEUE (Slurm, timeout, Ctrl-C)."""

RESCHEDULABLE = ("log_every", "checkpoint_every", "checkpoint_every_minutes", "checkpoint_async", "eval_every",
                 "eval_every_minutes", "eval_batches", "keep_checkpoints", "compile", "channels_last", "cpu")
"""Stage keys that a resume may change: they schedule the run without changing what it computes."""

RESCHEDULABLE_DATA = ("data.workers", "data.resident")
"""Data keys that a resume may change: how the same batches are made, not which."""

ONE_RUN = ("run.restart_damaged", "discriminator.min_pretrain_accuracy")
"""Keys that instruct one run rather than describe the experiment: never compared on resume."""

LENGTHS = ("epochs", "max_steps")
"""Stage keys that a resume may raise (a longer run), never lower."""

clock = time.monotonic
"""The time source of `checkpoint_every_minutes` and `eval_every_minutes`, read by the main process
only (tests replace it)."""


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, mismatched run folder); one line names the cause."""


@dataclass
class TrainState:
    """Where a stage is, checkpointed with the models: the step, and the current epoch's losses.

    An epoch's losses are kept as `epoch_sums`: sums over its steps of each step's mean over ranks
    (the same on every rank), plus `rank_sums`, this rank's own sums since the last fold into
    `epoch_sums` (`TrainingSession._fold_epoch_sums`, at checkpoints and at the epoch's end). Only
    `epoch_sums` is checkpointed, so an epoch's means stay exact across a resume, also onto another
    world size.
    """

    step: int = 0
    epoch_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    rank_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    epoch_steps: int = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.rank_sums[name] = self.rank_sums.get(name, 0.0) + value.float()
        self.epoch_steps += 1

    def state_dict(self) -> dict[str, Any]:
        assert not self.rank_sums, "fold the ranks' sums before saving"
        return {"step": self.step, "epoch_steps": self.epoch_steps,
                "epoch_sums": {name: value.cpu() for name, value in self.epoch_sums.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.epoch_steps = int(state["epoch_steps"])
        self.epoch_sums = dict(state["epoch_sums"])
        self.rank_sums = {}


class TrainingSession:
    """Accelerator + run folder + checkpoints + signals + metrics for one training stage."""

    def __init__(self, cfg: Config, stage: str, stage_cfg: StageConfig, models: tuple[str, ...] = ("model",)) -> None:
        self.cfg = cfg
        self.stage_cfg = stage_cfg
        self.dir = Path(cfg.run.root) / cfg.run.name / stage
        self.stage_key = "pretrain" if stage_cfg is cfg.pretrain else "train"
        self.accelerator = make_accelerator(stage_cfg, models)
        self.uses_deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if stage_cfg.batch_size % self.world_size:
            raise TrainingError(f"{self.stage_key}.batch_size={stage_cfg.batch_size} (the global batch) is not "
                                f"divisible by the world size {self.world_size}")
        self.batch_size_per_rank = stage_cfg.batch_size // self.world_size
        if self.batch_size_per_rank < MIN_BATCH_PER_RANK:
            raise TrainingError(f"{self.stage_key}.batch_size={stage_cfg.batch_size} (the global batch) on world size "
                                f"{self.world_size} leaves {self.batch_size_per_rank} image per rank; BatchNorm needs "
                                f"at least {MIN_BATCH_PER_RANK}: raise the batch (docs/scaling.md) or use fewer ranks")
        if stage_cfg.compile and self.device.type == "cpu":
            check_cpu_compiler(self.stage_key)
        if self.device.type == "cpu":  # every step allocates the same large gradients (hybridgan.host_memory)
            keep_freed_memory()
        set_seed(cfg.run.seed, device_specific=False)
        self.state = TrainState()
        self.accelerator.register_for_checkpointing(self.state)
        self.checkpoints = CheckpointManager(self.accelerator, self.dir, stage_cfg.keep_checkpoints,
                                             background=stage_cfg.checkpoint_async)
        self.logger = MetricsLogger(self.dir, enabled=False)
        self._lock = StageLock(self.dir)
        self._stop_signal: int | None = None
        self._pending_losses: list[tuple[int, dict[str, torch.Tensor]]] = []
        self._models: dict[str, torch.nn.Module] = {}
        self._grad_norms: list[tuple[int, str, torch.Tensor]] = []  # (step, model name, norm) since the last flush
        self._bar: tqdm | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._last_checkpoint_step = -1
        self._config_pending = False  # the main process writes config.yaml with the first checkpoint
        self._checkpointed_at = self._evaluated_at = 0.0  # the main process's `clock()`
        self._lock_stage()
        try:
            self._write_config()
        except TrainingError:
            self._lock.release()
            raise
        self.accelerator.wait_for_everyone()

    def _lock_stage(self) -> None:
        """The main process takes the stage folder's lock for the session's life; every rank stops
        with one line when it cannot (busy folder, or a folder it may not write)."""
        problem = None
        if self.is_main:
            try:
                self._lock.acquire()
            except StageBusyError as err:
                problem = str(err)
            except OSError as err:
                problem = f"{err.filename or self.dir}: cannot write the run folder ({err.strerror})"
        if any_rank(self.accelerator, problem is not None)[0]:
            raise TrainingError(problem or f"{self.dir}: the main process could not take this stage folder")

    def prepare(self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """`accelerator.prepare` of one model and its optimiser; under DeepSpeed each model gets the
        engine of the plugin called `name` (see `make_accelerator`); a bf16/fp16 engine gets its
        buffers in its dtype too, its inputs cast to that dtype and its outputs back to float32, so
        the loops stay unchanged."""
        if self.uses_deepspeed and len(self.accelerator.state.deepspeed_plugins or {}) > 1:
            self.accelerator.state.select_deepspeed_plugin(name)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        self._models[name] = model
        if self.uses_deepspeed:
            dtype = next(model.module.parameters()).dtype
            if dtype != torch.float32:
                for buffer in model.module.buffers():  # DeepSpeed casts parameters only, not BatchNorm's stats
                    if buffer.is_floating_point():
                        buffer.data = buffer.data.to(dtype)
                cast_floating_io(model.module, dtype)
        return model, optimizer

    def optimize(self, loss: torch.Tensor, model: Any, optimizer: Any) -> None:
        """Backward and step of one model: through its own engine under DeepSpeed (Accelerate's
        `backward` drives only the last engine prepared; the engine clips as its config says), else
        zero_grad, `accelerator.backward`, clipping to `grad_clip` when set, step. The learning rate
        follows `stage_lr` (a function of the step alone, so a resumed run steps alike). The gradient
        norm (the clipping's, or computed on the device without a sync) is checked at the next flush;
        not under fp16's loss scaling, whose scaler skips the steps with non-finite gradients."""
        lr = stage_lr(self.stage_cfg, self.state.step, self.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if self.uses_deepspeed:
            model.backward(loss)
            model.step()
            return
        optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        if self.stage_cfg.grad_clip > 0:
            norm = self.accelerator.clip_grad_norm_(model.parameters(), self.stage_cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        if self.accelerator.scaler is None:
            name = next((key for key, prepared in self._models.items() if prepared is model), "model")
            self._grad_norms.append((self.state.step + 1, name, norm.detach()))
        optimizer.step()

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    def print(self, *args: Any) -> None:
        """Print on the main process only."""
        self.accelerator.print(*args)

    def _write_config(self) -> None:
        """Every rank compares with the folder's config (so that all of them stop on a mismatch;
        the other stage's and evaluation's settings do not count). Keys that change the experiment
        are refused by name; scheduling keys (`RESCHEDULABLE`, `RESCHEDULABLE_DATA`) and a longer run
        (`LENGTHS` raised) are accepted, printed once and written into the folder's config. When the
        folder has none, the main process writes it with the first checkpoint (`checkpoint`): a
        stage that fails before that (a wrong path, a bad batch) leaves no config that would refuse
        the corrected command. A key the folder's config lacks (it was written by a version without
        that key) reads as the key's default, which is what that version did."""
        path = self.dir / "config.yaml"
        if not path.is_file():
            self._config_pending = self.is_main
            return
        old = _read_run_config(path)
        new = OmegaConf.create(to_yaml(self.cfg))
        other_stages = ("eval.", "train." if self.stage_key == "pretrain" else "pretrain.", *ONE_RUN)
        changed = [key for key in _changed_keys(OmegaConf.to_container(old), OmegaConf.to_container(new))
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
        self.print(f"{path}: accepted on resume: " + ", ".join(
            f"{key} {OmegaConf.select(old, key)} -> {OmegaConf.select(new, key)}" for key in accepted))
        if self.is_main:
            for key in accepted:
                OmegaConf.update(old, key, OmegaConf.select(new, key))
            write_text_atomic(path, OmegaConf.to_yaml(old))

    def _may_change_on_resume(self, key: str, old: Any, new: Any) -> bool:
        """Whether `key` may go from `old` to `new` on resume (see `_write_config`)."""
        stage, _, name = key.partition(".")
        if key in RESCHEDULABLE_DATA or (stage == self.stage_key and name in RESCHEDULABLE):
            return True
        if stage != self.stage_key or name not in LENGTHS:
            return False
        if name == "max_steps":  # 0: no limit but epochs
            return new == 0 or (old != 0 and new > old)
        return new > old

    def start(self, total_steps: int, steps_per_epoch: int,
              on_epoch_end: Callable[[int], None], on_eval: Callable[[], None] | None = None) -> int:
        """Resume from the latest checkpoint if there is one; start metrics and signals; returns the step.

        `on_epoch_end(epoch)` runs on every rank after the last step of each epoch and `on_eval()`
        every `eval_every` steps or `eval_every_minutes`, both before that step's checkpoint, so a
        resumed run never misses an epoch's record. The minutes count from here.
        """
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self._on_epoch_end = on_epoch_end
        self._on_eval = on_eval
        try:
            resumed_from = self._resume()
        except TrainingError:
            self._lock.release()
            raise
        self.logger = MetricsLogger(self.dir, enabled=self.is_main, resume_step=self.state.step, say=self.print)
        self._record_launch(resumed_from)
        self._previous_handlers = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        self._checkpointed_at = self._evaluated_at = clock()
        if self.is_main:
            self._bar = tqdm(total=total_steps, initial=self.state.step, desc=self.dir.name,
                             dynamic_ncols=True, file=sys.stderr)
        return self.state.step

    def _resume(self) -> dict[str, Any] | None:
        """Load the newest intact checkpoint, if any (chosen by the main process: damaged ones are
        moved aside and named); returns the world size and per-rank batch it was written with.

        Onto another world size the run continues exactly: the global batch is the same (the config
        check refuses another), global step g trains on the same images whatever the world size (the
        loader's contract) and the epoch's loss sums are per-step means over ranks. DeepSpeed's ZeRO
        checkpoints partition the optimizer state per rank, so there another world size is refused.
        """
        problem, name = None, None
        if self.is_main:
            try:
                found = self.checkpoints.find_resume_point(self.print, self.cfg.run.restart_damaged)
                name = found.name if found else None
            except (CheckpointError, OSError) as err:
                problem = str(err)
        if any_rank(self.accelerator, problem is not None)[0]:
            raise TrainingError(problem or f"{self.dir}: the main process found no usable checkpoint")
        name = broadcast_object_list([name])[0] if self.world_size > 1 else name
        if name is None:
            return None
        path = self.checkpoints.dir / name
        saved = self.checkpoints.saved_with(path)
        if saved and saved["world_size"] != self.world_size and self.uses_deepspeed:
            raise TrainingError(f"{path}: written by {saved['world_size']} DeepSpeed ranks, cannot resume on "
                                f"{self.world_size} (ZeRO partitions the optimizer state per rank); resume on "
                                f"{saved['world_size']}")
        self.checkpoints.load(path)
        self._last_checkpoint_step = self.state.step
        self.print(f"resumed {self.dir} from {name} (step {self.state.step})")
        if saved and saved["world_size"] != self.world_size:
            self.print(f"the checkpoint was written by {saved['world_size']} rank(s) x {saved['batch_size_per_rank']} "
                       f"images, resumed on {self.world_size} x {self.batch_size_per_rank}: same global batch "
                       f"{self.stage_cfg.batch_size}, same data order")
        return saved

    def _record_launch(self, resumed_from: dict[str, Any] | None) -> None:
        """Append how this (re)start ran to `launches.jsonl`: world size, per-rank batch, device,
        precision, step, and the world size of the checkpoint it resumed from."""
        if not self.is_main:
            return
        acc = self.accelerator
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(),
                  "world_size": acc.num_processes, "batch_size_per_rank": self.batch_size_per_rank,
                  "distributed_type": str(acc.distributed_type),
                  "device": str(acc.device), "mixed_precision": acc.mixed_precision,
                  "start_step": self.state.step, "total_steps": self.total_steps,
                  "resumed_from": resumed_from}
        set_aside_torn_line(self.dir / "launches.jsonl", self.print)
        append_record(self.dir / "launches.jsonl", record)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def batches(self, loader: Callable[[int, int], Iterable[Any]]) -> Iterator[tuple[int, Any]]:
        """(epoch, batch) pairs from the resumed step to `total_steps`, `steps_per_epoch` per epoch.

        `loader(epoch, start)` yields the epoch's batches from batch `start` on: the loader is a pure
        function of (seed, epoch, position), so a resumed epoch continues on exactly the batches an
        uninterrupted run would have seen, without decoding the ones already trained.
        """
        while self.state.step < self.total_steps:
            epoch = self.state.step // self.steps_per_epoch
            skip = self.state.step - epoch * self.steps_per_epoch
            for index, batch in enumerate(loader(epoch, skip), start=skip):
                if index >= self.steps_per_epoch or self.state.step >= self.total_steps:
                    break
                yield epoch, batch
            if self.state.step < (epoch + 1) * self.steps_per_epoch and self.state.step < self.total_steps:
                raise TrainingError(
                    f"epoch {epoch}: the loader ran out after {self.state.step - epoch * self.steps_per_epoch}"
                    f" of {self.steps_per_epoch} batches")

    def end_step(self, epoch: int, losses: dict[str, torch.Tensor]) -> None:
        """Count one optimisation step; log, check for NaN, evaluate, checkpoint and honour signals as due.

        `losses` are detached device tensors: they are read back (a host-device sync) only every
        `log_every` steps, at checkpoints and on stop, never on every step.
        """
        self.state.step += 1
        self.state.add(losses)
        self._pending_losses.append((self.state.step, losses))
        if self._bar is not None:
            self._bar.update(1)
        step, every = self.state.step, self.stage_cfg
        epoch_done = step % self.steps_per_epoch == 0 or step == self.total_steps
        stop, checkpoint_time, eval_time = self._agree_on_signals_and_clock()
        checkpoint_due = _every(step, every.checkpoint_every) or checkpoint_time or epoch_done or stop
        eval_due = self._on_eval is not None and (_every(step, every.eval_every) or eval_time)
        if step % every.log_every == 0 or checkpoint_due or eval_due:
            self.flush_losses(epoch)
        if eval_due:
            self._on_eval()
            self._evaluated_at = clock()
        if epoch_done:
            self.logger.scalars("epoch", step, epoch + 1, self._epoch_means(reset=step % self.steps_per_epoch == 0))
            self._on_epoch_end(epoch)
        if checkpoint_due:
            self.checkpoint()
        if stop:
            self.print(f"signal {self._stop_signal}: checkpointed {self.dir} at step {step}; "
                       f"re-run the same command to resume")
            self.close()
            sys.exit(EXIT_REQUEUE)

    def flush_losses(self, epoch: int) -> dict[str, float]:
        """Read back the losses since the last flush (means over ranks: all ranks call it at the same
        step) and log their means; raise TrainingError on the first non-finite one, then on a
        non-finite gradient norm since the last flush or weight or buffer now (`_check_finite_state`).

        `epoch` is 0-based here as everywhere in the code; records in metrics.jsonl count from 1.
        """
        if not self._pending_losses:
            return {}
        steps = [step for step, _ in self._pending_losses]
        names = list(self._pending_losses[0][1])
        stacked = torch.stack([torch.stack([losses[n].float() for n in names])
                               for _, losses in self._pending_losses]).cpu()
        self._pending_losses.clear()
        finite = torch.isfinite(stacked)
        if self.world_size > 1:  # log each step's mean over ranks; a non-finite loss anywhere spreads
            stacked = self.accelerator.reduce(stacked.to(self.device), reduction="sum").cpu() / self.world_size
        if not bool(torch.isfinite(stacked).all()):
            if bool(finite.all()):
                self._stop_non_finite(f"steps {steps[0]}-{steps[-1]}: another rank saw a non-finite loss")
            row, col = (~finite).nonzero()[0].tolist()
            self._stop_non_finite(f"step {steps[row]}: {names[col]} is {stacked[row, col].item()}")
        self._check_finite_state()
        means = dict(zip(names, stacked.mean(dim=0).tolist()))
        self.logger.scalars("train", steps[-1], epoch + 1, means)
        if self._bar is not None:
            self._bar.set_postfix({n: f"{v:.4f}" for n, v in means.items()}, refresh=False)
        return means

    def _check_finite_state(self) -> None:
        """TrainingError (on every rank, after `close`) when a gradient norm since the last flush, or
        a weight or buffer of a model now (BatchNorm's running statistics too, which no loss shows),
        holds NaN or an infinity. Per-tensor flags, one host-device sync."""
        norms, self._grad_norms = self._grad_norms, []
        problem = None
        if norms:
            finite = torch.isfinite(torch.stack([norm.float() for _, _, norm in norms])).cpu()
            if not bool(finite.all()):
                step, name, norm = norms[int((~finite).nonzero()[0])]
                problem = f"step {step}: the gradient norm of {name} is {norm.item()}"
        if problem is None:
            bad = non_finite((f"{name}.{key}", tensor) for name, model in self._models.items()
                             for key, tensor in self.accelerator.unwrap_model(model).state_dict().items())
            if bad is not None:
                problem = f"step {self.state.step}: {bad} holds NaN or an infinity"
        if any_rank(self.accelerator, problem is not None)[0]:
            self._stop_non_finite(problem or f"step {self.state.step}: another rank saw a non-finite gradient "
                                             f"norm, weight or buffer")

    def _stop_non_finite(self, what: str) -> None:
        """Close the session and raise TrainingError: `what`, and the checkpoint that is kept."""
        self.close()
        latest = self.checkpoints.latest()
        kept = f"the last good checkpoint {latest} is kept" if latest else "no checkpoint was written yet"
        raise TrainingError(f"{what}; stopped, {kept}")

    def _fold_epoch_sums(self) -> None:
        """Add the mean over ranks of the ranks' own loss sums to `state.epoch_sums` (all ranks)."""
        if not self.state.rank_sums:
            return
        names = sorted(self.state.rank_sums)
        sums = torch.stack([self.state.rank_sums[n].to(self.device) for n in names])
        means = (self.accelerator.reduce(sums, reduction="sum") / self.world_size).cpu()
        for name, value in zip(names, means.unbind()):
            self.state.epoch_sums[name] = self.state.epoch_sums.get(name, 0.0) + value
        self.state.rank_sums = {}

    def _epoch_means(self, reset: bool) -> dict[str, float]:
        """This epoch's mean of every loss over all steps and ranks so far; `reset` (at the epoch's
        end) starts the next epoch's sums. A run that stops inside an epoch (`max_steps`) keeps
        them, so that a longer resumed run records the whole epoch."""
        self._fold_epoch_sums()
        means = {name: float(total) / self.state.epoch_steps for name, total in sorted(self.state.epoch_sums.items())}
        if reset:
            self.state.epoch_sums, self.state.epoch_steps = {}, 0
        return means

    def _agree_on_signals_and_clock(self) -> tuple[bool, bool, bool]:
        """(stop, checkpoint due by the minutes, evaluation due by the minutes), the same on every rank.

        The stop is any rank's `STOP_SIGNALS`; the minutes are the main process's clock since the
        last checkpoint or evaluation (of either cadence). One process decides every step (a clock
        read is free); several agree at log steps only, in one all-reduce of the three flags (an
        all-reduce and a host-device sync per step would cost more), so set `log_every` to a few
        steps' time well inside the grace period (torchrun gives workers 30 s after SIGTERM).
        """
        if self.world_size > 1 and self.state.step % self.stage_cfg.log_every != 0:
            return False, False, False
        checkpoint_time = eval_time = False
        if self.is_main:
            now, every = clock(), self.stage_cfg
            checkpoint_time = 0 < every.checkpoint_every_minutes * 60 <= now - self._checkpointed_at
            eval_time = 0 < every.eval_every_minutes * 60 <= now - self._evaluated_at
        stop, checkpoint_time, eval_time = any_rank(self.accelerator, self._stop_signal is not None,
                                                    checkpoint_time, eval_time)
        if stop and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM
        return stop, checkpoint_time, eval_time

    def checkpoint(self) -> None:
        """Save a checkpoint of the current step, once (all ranks must call it).

        Accelerate saves registered objects from the main process only, so the ranks' running loss
        sums are first folded into the epoch sums every rank holds alike. The minutes until the next
        checkpoint by `checkpoint_every_minutes` count from here. A failed background write of the
        previous checkpoint closes the session and raises TrainingError naming its folder.
        """
        if self._last_checkpoint_step == self.state.step:
            return
        if self._config_pending:
            save_config(self.cfg, self.dir / "config.yaml")
            self._config_pending = False
        self._fold_epoch_sums()
        try:
            self.checkpoints.save(self.state.step, {"world_size": self.world_size,
                                                    "batch_size_per_rank": self.batch_size_per_rank})
        except CheckpointError as err:
            self.close()
            raise TrainingError(str(err)) from None
        self._last_checkpoint_step = self.state.step
        self._checkpointed_at = clock()

    def close(self) -> None:
        """Wait for the checkpoint write in flight, close the progress bar and the metrics, release
        the stage folder, and give the stop signals back to whatever handled them before (a stage
        run inside a longer-lived process). Raises TrainingError, once all that is done, when the
        last checkpoint could not be written (naming its folder; the previous one stays the latest)."""
        try:
            self.checkpoints.wait()
        except CheckpointError as err:
            failure = str(err)
        else:
            failure = None
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.logger.close()
        self._lock.release()
        if failure is not None:
            raise TrainingError(failure)

    def finish(self) -> None:
        """Final checkpoint (if the last step has none yet) and close."""
        self.checkpoint()
        self.close()


def _read_run_config(path: Path) -> DictConfig:
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


def _every(step: int, steps: int) -> bool:
    """Whether `step` is on a cadence of `steps` steps (0: off)."""
    return steps > 0 and step % steps == 0


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def require_deepspeed(models: tuple[str, ...]) -> None:
    """TrainingError naming what is missing when a DeepSpeed launch finds DeepSpeed (or, for one
    engine per model, `transformers`, which Accelerate's several-plugin path imports) not installed."""
    needed = ("deepspeed", "transformers") if len(models) > 1 else ("deepspeed",)
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise TrainingError(f"the launch asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true), and {' and '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'hybridgan[deepspeed]'")


def make_accelerator(stage_cfg: StageConfig, models: tuple[str, ...]) -> Accelerator:
    """The Accelerator for whatever `accelerate launch` set up, with the stage's mixed precision.

    Under `accelerate launch --use_deepspeed` a stage that trains several models gets one
    DeepSpeed plugin (engine) per model, named by `models`, each from the launch's settings; on a
    machine without CUDA the process group uses gloo.
    """
    cpu = stage_cfg.cpu or not torch.cuda.is_available()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return Accelerator(cpu=cpu, mixed_precision=resolve_mixed_precision(stage_cfg.mixed_precision, cpu))
    require_deepspeed(models)
    handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu else []
    plugins = {name: DeepSpeedPlugin() for name in models} if len(models) > 1 else None
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(stage_cfg.mixed_precision, cpu),
                              kwargs_handlers=handlers, deepspeed_plugins=plugins)
    for plugin in accelerator.state.deepspeed_plugins.values():
        # Our loaders are not prepared by Accelerate, so DeepSpeed cannot read the batch size off them;
        # the objective is the DDP path's: clipping only when the stage config asks (0 is off).
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = max(
            1, stage_cfg.batch_size // accelerator.num_processes)
        plugin.deepspeed_config["gradient_clipping"] = stage_cfg.grad_clip
    return accelerator


def cast_floating_io(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Hooks on `module`: floating-point tensor inputs are cast to `dtype` (the dtype of a DeepSpeed
    bf16/fp16 engine's weights), floating-point tensor outputs back to float32, so that the losses
    are computed in float32 and callers pass float32 as everywhere else."""

    def cast(value: Any, to: torch.dtype) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(to)
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple such as DiscOutput
            return type(value)(*(cast(item, to) for item in value))
        if isinstance(value, (tuple, list)):
            return type(value)(cast(item, to) for item in value)
        if isinstance(value, dict):
            return {key: cast(item, to) for key, item in value.items()}
        return value

    module.register_forward_pre_hook(lambda _module, args: cast(args, dtype))
    module.register_forward_hook(lambda _module, _args, output: cast(output, torch.float32))


def stage_lr(stage_cfg: StageConfig, step: int, total_steps: int) -> float:
    """The stage's learning rate at 0-based `step` of `total_steps`: `scaled_lr`, ramped linearly over
    the first `warmup_steps` steps (step 0 takes 1 / warmup_steps of it), then with `lr_decay: cosine`
    falling along a half cosine from there to 0 after the last step. A function of the step and the
    stage's length alone: a resumed run steps alike (lengthening a run re-draws the decay ahead)."""
    lr = scaled_lr(stage_cfg)
    if stage_cfg.warmup_steps > 0:
        lr *= min(1.0, (step + 1) / stage_cfg.warmup_steps)
    decay_steps = total_steps - stage_cfg.warmup_steps
    if stage_cfg.lr_decay == "cosine" and decay_steps > 0:
        progress = min(1.0, max(0, step - stage_cfg.warmup_steps) / decay_steps)
        lr *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


def build_adam(model: torch.nn.Module, stage_cfg: StageConfig) -> torch.optim.Adam:
    """Adam with the stage's betas and lr (after its `lr_scaling` rule): fused kernels on CUDA and
    on the CPU (PyTorch >= 2.4 has a fused CPU Adam)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=scaled_lr(stage_cfg), betas=tuple(stage_cfg.betas), fused=True)


def check_cpu_compiler(stage_key: str) -> None:
    """TrainingError (one line) when `<stage>.compile=true` on the CPU cannot work: Inductor compiles
    C++ there and finds no compiler (it looks for `CXX`, then g++), instead of failing inside the
    first step."""
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except (exc.InvalidCxxCompiler, OSError) as err:
        raise TrainingError(f"{stage_key}.compile=true: torch.compile on the CPU needs a C++ compiler and found none "
                            f"({type(err).__name__}); install g++ or set CXX, or set {stage_key}.compile=false") from None


def speed_up(model: torch.nn.Module, stage_cfg: StageConfig) -> torch.nn.Module:
    """channels_last memory format and torch.compile, as the stage config asks."""
    if use_channels_last(stage_cfg.channels_last, model):
        model = model.to(memory_format=torch.channels_last)
    if stage_cfg.compile:
        model = torch.compile(model)
    return model


def run_stage(session: TrainingSession, steps_per_epoch: int,
              step: Callable[[dict], dict[str, torch.Tensor]], on_epoch_end: Callable[[int], None],
              loader: Callable[[int, int], Iterable[Any]], on_eval: Callable[[], None] | None = None) -> None:
    """The loop both stages share: `epochs` x `steps_per_epoch` steps (or `max_steps`), resumable."""
    stage_cfg = session.stage_cfg
    if steps_per_epoch < 1:
        raise TrainingError(f"{session.cfg.data.shards}: too few training images for one global batch of "
                            f"{stage_cfg.batch_size}")
    total = stage_cfg.epochs * steps_per_epoch if stage_cfg.epochs else stage_cfg.max_steps
    if stage_cfg.max_steps:
        total = min(total, stage_cfg.max_steps)
    session.start(total, steps_per_epoch, on_epoch_end, on_eval)
    for epoch, batch in session.batches(loader):
        session.end_step(epoch, step(batch))


STAGE_EXAMPLES = {
    "hybridgan.pretrain": ["python -m hybridgan.pretrain --config configs/paper.yaml",
                           "python -m hybridgan.pretrain --config configs/smoke-cpu.yaml pretrain.max_steps=20"],
    "hybridgan.train": ["python -m hybridgan.train --config configs/paper.yaml",
                        "python -m hybridgan.train --config configs/paper.yaml discriminator.kind=pathak",
                        "python -m hybridgan.train --config configs/smoke-cpu.yaml train.epochs=1"],
}
"""What the --help of each stage's command line ends with: commands as typed."""


def run_stage_cli(stage: Callable[[Config], Any], description: str, argv: list[str] | None = None) -> None:
    """A stage's command line (`--config FILE` and `key=value` overrides): run it, and print a known
    failure as one line on stderr with exit code 1. Set HYBRIDGAN_DEBUG=1 for the full traceback."""
    spec = sys.modules[stage.__module__].__spec__  # under `python -m`, the module is __main__
    module = spec.name if spec is not None else stage.__module__
    parser = cli_parser(module, description, STAGE_EXAMPLES.get(module, []))
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(argv))
    try:
        stage(cfg)
    except OSError as err:  # e.g. a read-only run folder: name the path, no traceback
        if os.environ.get("HYBRIDGAN_DEBUG"):
            raise
        print(f"error: {f'{err.filename}: {err.strerror}' if err.filename else err}", file=sys.stderr)
        sys.exit(1)
    except (TrainingError, ValueError) as err:
        if os.environ.get("HYBRIDGAN_DEBUG"):
            raise
        # an error raised in a DataLoader worker comes back wrapped with the worker's traceback:
        # its last line is the original one
        lines = str(err).strip().splitlines() or [type(err).__name__]
        print(f"error: {lines[-1]}", file=sys.stderr)
        sys.exit(1)
