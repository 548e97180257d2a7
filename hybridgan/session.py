"""The training core shared by `pretrain` and `train`: everything a loop needs that is not the model.

A `TrainingSession` owns, for one stage folder `runs/<name>/<stage>/`:
- the Accelerator (CPU, one or many GPUs, many nodes, DeepSpeed: whatever `accelerate launch` set up;
  `mixed_precision` from the stage config; `hybridgan.core.engine`),
- the stage folder (`hybridgan.core.folder`): its lock (`hybridgan.lock`: a second process on a busy
  folder is refused at once) and the resolved config (`config.yaml`, written with the first
  checkpoint, so that a stage that fails before it pins nothing; a re-run that changes the
  experiment is refused, naming the keys; scheduling settings and a longer run are accepted and
  written back),
- the global batch: `batch_size` images per optimiser step on any world size, `batch_size_per_rank`
  on each rank (`hybridgan.core.engine`),
- resume: re-running the same command loads the newest intact checkpoint and continues from its
  step, on the same or another world size (`hybridgan.core.resume`),
- checkpoints every `checkpoint_every` steps or `checkpoint_every_minutes` (and on SIGTERM/SIGUSR1/
  SIGINT, then exit code 75 so that a scheduler requeues and the re-run resumes), keeping the last
  `keep_checkpoints`, written in the background (`checkpoint_async`; saved and waited for by
  `hybridgan.core.resume`, written by `hybridgan.checkpoint`), and evaluation every `eval_every`
  steps or `eval_every_minutes` (`hybridgan.core.cadence`),
- the NaN guard: a non-finite loss, gradient norm, weight or buffer (BatchNorm's running statistics)
  stops the run with one line naming the step and the value, before any checkpoint or export of it,
  and the last good checkpoint stays the latest (`hybridgan.core.loss_book`),
- rank-0-only metrics (`metrics.jsonl`, the trackers of `tracking.backends`) and the progress bar
  (`hybridgan.core.progress`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from accelerate.utils import DistributedType, set_seed
from omegaconf import OmegaConf

from hybridgan.config import Config, StageConfig
from hybridgan.core.cadence import Cadence, epoch_batches
from hybridgan.core.cli import run_stage_cli
from hybridgan.core.engine import (MIN_BATCH_PER_RANK, backward_and_step, batch_size_per_rank, build_adam,
                                   check_cpu_compiler, make_accelerator, prepare_model, require_deepspeed, speed_up,
                                   stage_lr)
from hybridgan.core.errors import TrainingError
from hybridgan.core.folder import StageFolder
from hybridgan.core.loss_book import LossBook, NonFinite, TrainState
from hybridgan.core.progress import StageProgress
from hybridgan.core.resume import StageCheckpoints
from hybridgan.data.loader import batches_per_epoch, train_loader
from hybridgan.host_memory import keep_freed_memory
from hybridgan.tracking import MetricsLogger, flat_config, stage_trackers

__all__ = ["EXIT_REQUEUE", "MIN_BATCH_PER_RANK", "TrainState", "TrainingError", "TrainingSession", "build_adam",
           "clock", "require_deepspeed", "run_stage", "run_stage_cli", "speed_up", "stage_lr"]

EXIT_REQUEUE = 75
"""Exit code after a signal-triggered checkpoint (EX_TEMPFAIL): not done, re-run to resume."""

clock = time.monotonic
"""The time source of `checkpoint_every_minutes` and `eval_every_minutes`, read by the main process
only (tests replace it)."""


class TrainingSession:
    """Accelerator + stage folder + cadence + loss book + checkpoints + metrics for one training stage."""

    def __init__(self, cfg: Config, stage: str, stage_cfg: StageConfig, models: tuple[str, ...] = ("model",)) -> None:
        self.cfg = cfg
        self.stage_cfg = stage_cfg
        self.dir = Path(cfg.run.root) / cfg.run.name / stage
        self.stage_key = "pretrain" if stage_cfg is cfg.pretrain else "train"
        self.accelerator = make_accelerator(stage_cfg, models, stage_trackers(cfg.tracking.backends, cfg.run.name,
                                                                              self.dir), self.stage_key)
        self.uses_deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        self.is_main, self.device = self.accelerator.is_main_process, self.accelerator.device
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.batch_size_per_rank = batch_size_per_rank(self.stage_key, stage_cfg.batch_size, self.world_size)
        if stage_cfg.compile and self.device.type == "cpu":
            check_cpu_compiler(self.stage_key)
        if self.device.type == "cpu":  # every step allocates the same large gradients (hybridgan.host_memory)
            keep_freed_memory()
        set_seed(cfg.run.seed, device_specific=False)
        self.state = TrainState()
        self.accelerator.register_for_checkpointing(self.state)
        self.progress = StageProgress(self.dir)
        self.folder = StageFolder(self.dir, cfg, self.stage_key, self.accelerator)
        self.cadence = Cadence(stage_cfg, self.accelerator, clock=lambda: clock())  # read late: tests replace it
        self.losses = LossBook(self.accelerator, self.state)
        self.checkpoints = StageCheckpoints(self.accelerator, self.folder, self.losses, self.cadence, stage_cfg,
                                            {"world_size": self.world_size,
                                             "batch_size_per_rank": self.batch_size_per_rank},
                                            cfg.run.restart_damaged)
        self.total_steps = 0  # set by `start`; before it, `optimize` steps at the undecayed lr (`stage_lr`)
        self.folder.open()
        self.accelerator.wait_for_everyone()

    @property
    def logger(self) -> MetricsLogger:
        """The stage's records (`metrics.jsonl`, the trackers), for the loops' own scalars and images."""
        return self.progress.logger

    def print(self, *args: Any) -> None:
        """Print on the main process only."""
        self.accelerator.print(*args)

    def prepare(self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """`accelerator.prepare` of one model and its optimiser (`engine.prepare_model`); the NaN
        guard watches the model from here."""
        model, optimizer = prepare_model(self.accelerator, name, model, optimizer, self.uses_deepspeed)
        self.losses.models[name] = model
        return model, optimizer

    def optimize(self, loss: torch.Tensor, model: Any, optimizer: Any) -> None:
        """Backward and step of one model (`engine.backward_and_step`). The learning rate follows
        `stage_lr` (a function of the step alone, so a resumed run steps alike). The gradient norm is
        checked at the next flush; not under fp16's loss scaling, whose scaler skips the steps with
        non-finite gradients, nor under DeepSpeed."""
        lr = stage_lr(self.stage_cfg, self.state.step, self.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        norm = backward_and_step(self.accelerator, loss, model, optimizer, self.stage_cfg.grad_clip,
                                 self.uses_deepspeed)
        if norm is not None and self.accelerator.scaler is None:
            self.losses.add_grad_norm(self.state.step + 1, model, norm)

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
            resumed_from = self.checkpoints.resume()
        except TrainingError:
            self.folder.release()
            raise
        self.progress.open(self.accelerator, self.state.step, total_steps,
                           flat_config(OmegaConf.to_container(OmegaConf.structured(self.cfg))))
        self.folder.record_launch(batch_size_per_rank=self.batch_size_per_rank, start_step=self.state.step,
                                  total_steps=total_steps, resumed_from=resumed_from)
        self.cadence.start()
        return self.state.step

    def batches(self, loader: Callable[[int, int], Iterable[Any]]) -> Iterator[tuple[int, Any]]:
        """(epoch, batch) pairs from the resumed step to `total_steps` (`cadence.epoch_batches`)."""
        return epoch_batches(loader, self.steps_per_epoch, self.total_steps, lambda: self.state.step)

    def end_step(self, epoch: int, losses: dict[str, torch.Tensor]) -> None:
        """Count one optimisation step; log, check for NaN, evaluate, checkpoint and honour signals as due.

        `losses` are detached device tensors: they are read back (a host-device sync) only every
        `log_every` steps, at checkpoints and on stop, never on every step.
        """
        self.state.step += 1
        step = self.state.step
        self.losses.add(step, losses)
        self.progress.stepped()
        due = self.cadence.due(step, self.steps_per_epoch, self.total_steps, self._on_eval is not None)
        if due.flush:
            self.flush_losses(epoch)
        if due.evaluate:
            self._on_eval()
            self.cadence.evaluated()
        if due.epoch_end:
            self.logger.scalars("epoch", step, epoch + 1,
                                self.losses.epoch_means(reset=step % self.steps_per_epoch == 0))
            self._on_epoch_end(epoch)
        if due.checkpoint:
            self.checkpoint()
        if due.stop:
            self.print(f"signal {self.cadence.stop_signal}: checkpointed {self.dir} at step {step}; "
                       f"re-run the same command to resume")
            self.close()
            sys.exit(EXIT_REQUEUE)

    def flush_losses(self, epoch: int) -> dict[str, float]:
        """Read back the losses since the last flush (means over ranks: all ranks call it at the same
        step) and log their means; raise TrainingError on the first non-finite one, then on a
        non-finite gradient norm since the last flush or weight or buffer now (`LossBook.read_back`).

        `epoch` is 0-based here as everywhere in the code; records in metrics.jsonl count from 1.
        """
        try:
            read = self.losses.read_back()
        except NonFinite as err:  # close the session; the newest checkpoint is the last good one
            self.close()
            raise TrainingError(f"{err}; stopped, {self.checkpoints.kept()}")
        if read is None:
            return {}
        last_step, means = read
        self.progress.losses(last_step, epoch + 1, means)
        return means

    def checkpoint(self) -> None:
        """Save a checkpoint of the current step, once (all ranks must call it; `StageCheckpoints.save`).
        A failed background write of the previous checkpoint closes the session and raises
        TrainingError naming its folder."""
        try:
            self.checkpoints.save()
        except TrainingError:
            self.close()
            raise

    def close(self) -> None:
        """Wait for the checkpoint write in flight, close the progress bar and the metrics, release
        the stage folder, and give the stop signals back to whatever handled them before (a stage
        run inside a longer-lived process). Raises TrainingError, once all that is done, when the
        last checkpoint could not be written (naming its folder; the previous one stays the latest)."""
        try:
            self.checkpoints.wait()
        except TrainingError as err:
            failure = err
        else:
            failure = None
        self.cadence.restore_signals()
        self.progress.close()
        self.folder.release()
        if failure is not None:
            raise failure

    def finish(self) -> None:
        """Final checkpoint (if the last step has none yet) and close."""
        self.checkpoint()
        self.close()


def run_stage(session: TrainingSession, step: Callable[[dict], dict[str, torch.Tensor]],
              on_epoch_end: Callable[[int], None], on_eval: Callable[[], None] | None = None,
              with_blur: bool = False) -> None:
    """The loop both stages share: `epochs` epochs of the train split (or `max_steps` steps), resumable.
    `with_blur`: batches with the pretraining blur (`hybridgan.data.loader.train_loader`)."""
    cfg, stage_cfg = session.cfg, session.stage_cfg
    steps_per_epoch = batches_per_epoch(cfg, "train", stage_cfg.batch_size)
    loader = train_loader(cfg, "train", batch_size=stage_cfg.batch_size, rank=session.rank,
                          world_size=session.world_size, device=session.device, with_blur=with_blur)
    if steps_per_epoch < 1:
        raise TrainingError(f"{cfg.data.shards}: too few training images for one global batch of "
                            f"{stage_cfg.batch_size}")
    total = stage_cfg.epochs * steps_per_epoch if stage_cfg.epochs else stage_cfg.max_steps
    if stage_cfg.max_steps:
        total = min(total, stage_cfg.max_steps)
    session.start(total, steps_per_epoch, on_epoch_end, on_eval)
    for epoch, batch in session.batches(loader):
        session.end_step(epoch, step(batch))
