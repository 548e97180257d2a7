"""What a stage shows while it trains: its records and, on the main process, the progress bar."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from tqdm.auto import tqdm

from hybridgan.tracking import MetricsLogger


class StageProgress:
    """The records of one stage (`metrics.jsonl` and the trackers of `tracking.backends`, through
    `logger`) and its progress bar, which shows the last logged losses. Both live on the main process
    only; before `open` (a session not started yet) nothing is written."""

    def __init__(self, stage_dir: Path) -> None:
        self.dir = stage_dir
        self.logger = MetricsLogger(stage_dir, None)
        self._bar: tqdm | None = None

    def open(self, accelerator: Accelerator, step: int, total_steps: int, config: dict[str, Any]) -> None:
        """Start the records at `step` (later records of an interrupted run are dropped: they will be
        trained and logged again) and the bar at `step` of `total_steps`."""
        self.logger = MetricsLogger(self.dir, accelerator, resume_step=step, say=accelerator.print, config=config)
        if accelerator.is_main_process:
            self._bar = tqdm(total=total_steps, initial=step, desc=self.dir.name, dynamic_ncols=True,
                             file=sys.stderr)

    def stepped(self) -> None:
        """One more optimisation step done."""
        if self._bar is not None:
            self._bar.update(1)

    def losses(self, step: int, epoch: int, means: dict[str, float]) -> None:
        """Record the training losses read back at `step` (`epoch` counts from 1) and show them."""
        self.logger.scalars("train", step, epoch, means)
        if self._bar is not None:
            self._bar.set_postfix({name: f"{value:.4f}" for name, value in means.items()}, refresh=False)

    def close(self) -> None:
        """Close the bar and end the trackers' runs."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.logger.close()
