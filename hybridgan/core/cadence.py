"""The cadence of a stage: which step of which epoch (`epoch_batches`), and what each step is due
for (`Cadence.due`: a log, an evaluation, an epoch's end, a checkpoint, a stop) by steps, by minutes
of the main process's clock and by stop signals, the same on every rank."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from accelerate import Accelerator

from hybridgan.checkpoint import any_rank
from hybridgan.config import StageConfig
from hybridgan.core.errors import TrainingError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""Signals that checkpoint the current step and exit with EXIT_REQUEUE (Slurm, timeout, Ctrl-C)."""


def every(step: int, steps: int) -> bool:
    """Whether `step` is on a cadence of `steps` steps (0: off)."""
    return steps > 0 and step % steps == 0


@dataclass(frozen=True)
class Due:
    """What a step that just ended is due for, the same on every rank."""

    flush: bool  # read back and log the losses (a log step, or before an evaluation or checkpoint)
    evaluate: bool
    epoch_end: bool
    checkpoint: bool
    stop: bool  # a stop signal reached some rank: checkpoint and exit


class Cadence:
    """The steps, minutes and stop signals of one stage (`stage_cfg`'s `log_every`, `eval_every`,
    `eval_every_minutes`, `checkpoint_every`, `checkpoint_every_minutes`). `clock` is read by the main
    process only."""

    def __init__(self, stage_cfg: StageConfig, accelerator: Accelerator, clock: Callable[[], float]) -> None:
        self.stage_cfg = stage_cfg
        self.accelerator = accelerator
        self.clock = clock
        self.stop_signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._checkpointed_at = self._evaluated_at = 0.0

    def start(self) -> None:
        """Catch the stop signals; the minutes count from here."""
        self._previous_handlers = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        self._checkpointed_at = self._evaluated_at = self.clock()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum

    def restore_signals(self) -> None:
        """Give the stop signals back to whatever handled them before (a stage run inside a
        longer-lived process)."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def checkpointed(self) -> None:
        """The minutes until the next checkpoint by `checkpoint_every_minutes` count from now."""
        self._checkpointed_at = self.clock()

    def evaluated(self) -> None:
        """The minutes until the next evaluation by `eval_every_minutes` count from now."""
        self._evaluated_at = self.clock()

    def due(self, step: int, steps_per_epoch: int, total_steps: int, evaluates: bool) -> Due:
        """What step `step` (counted from 1) is due for; `evaluates`: whether the stage evaluates
        between epochs at all. An epoch's end and a stop are checkpoints too."""
        every_cfg = self.stage_cfg
        epoch_end = step % steps_per_epoch == 0 or step == total_steps
        stop, checkpoint_time, eval_time = self._agree_on_signals_and_clock(step)
        checkpoint = every(step, every_cfg.checkpoint_every) or checkpoint_time or epoch_end or stop
        evaluate = evaluates and (every(step, every_cfg.eval_every) or eval_time)
        flush = step % every_cfg.log_every == 0 or checkpoint or evaluate
        return Due(flush, evaluate, epoch_end, checkpoint, stop)

    def _agree_on_signals_and_clock(self, step: int) -> tuple[bool, bool, bool]:
        """(stop, checkpoint due by the minutes, evaluation due by the minutes), the same on every rank.

        The stop is any rank's `STOP_SIGNALS`; the minutes are the main process's clock since the
        last checkpoint or evaluation (of either cadence). One process decides every step (a clock
        read is free); several agree at log steps only, in one all-reduce of the three flags (an
        all-reduce and a host-device sync per step would cost more), so set `log_every` to a few
        steps' time well inside the grace period (torchrun gives workers 30 s after SIGTERM).
        """
        if self.accelerator.num_processes > 1 and step % self.stage_cfg.log_every != 0:
            return False, False, False
        checkpoint_time = eval_time = False
        if self.accelerator.is_main_process:
            now, every_cfg = self.clock(), self.stage_cfg
            checkpoint_time = 0 < every_cfg.checkpoint_every_minutes * 60 <= now - self._checkpointed_at
            eval_time = 0 < every_cfg.eval_every_minutes * 60 <= now - self._evaluated_at
        stop, checkpoint_time, eval_time = any_rank(self.accelerator, self.stop_signal is not None,
                                                    checkpoint_time, eval_time)
        if stop and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM
        return stop, checkpoint_time, eval_time


def epoch_batches(loader: Callable[[int, int], Iterable[Any]], steps_per_epoch: int, total_steps: int,
                  step_now: Callable[[], int]) -> Iterator[tuple[int, Any]]:
    """(epoch, batch) pairs from the step the training has reached, `step_now()` (it counts the steps
    as they end, so a resumed run starts where it stopped), to `total_steps`, `steps_per_epoch` per epoch.

    `loader(epoch, start)` yields the epoch's batches from batch `start` on: the loader is a pure
    function of (seed, epoch, position), so a resumed epoch continues on exactly the batches an
    uninterrupted run would have seen, without decoding the ones already trained.
    """
    while step_now() < total_steps:
        epoch = step_now() // steps_per_epoch
        skip = step_now() - epoch * steps_per_epoch
        for index, batch in enumerate(loader(epoch, skip), start=skip):
            if index >= steps_per_epoch or step_now() >= total_steps:
                break
            yield epoch, batch
        if step_now() < (epoch + 1) * steps_per_epoch and step_now() < total_steps:
            raise TrainingError(f"epoch {epoch}: the loader ran out after {step_now() - epoch * steps_per_epoch}"
                                f" of {steps_per_epoch} batches")
