"""Rank-0 metrics: `metrics.jsonl` (one JSON object per record) and TensorBoard events under `tb/`.

Records carry `step`, `epoch` and `split` ("train", "epoch", "val", "test") plus scalars; the same
scalars go to TensorBoard as `<split>/<name>`. On resume from step N, records after N (steps that
will be trained again) are dropped from `metrics.jsonl`, saying how many, and TensorBoard purges
them likewise, so every number in the run folder belongs to the weights that the checkpoints hold.
Nothing else is ever removed: records up to N stay.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.tensorboard import SummaryWriter

from hybridgan.atomic import write_text_atomic


class MetricsLogger:
    """Writes metrics and images when `enabled` (the main process); a no-op on other ranks."""

    def __init__(self, stage_dir: Path, enabled: bool, resume_step: int = 0,
                 say: Callable[[str], None] = print) -> None:
        self.enabled = enabled
        self.path = stage_dir / "metrics.jsonl"
        self.writer: SummaryWriter | None = None
        if not enabled:
            return
        stage_dir.mkdir(parents=True, exist_ok=True)
        self._drop_records_after(resume_step, say)
        purge = resume_step + 1 if resume_step > 0 else None
        self.writer = SummaryWriter(log_dir=str(stage_dir / "tb"), purge_step=purge)

    def _drop_records_after(self, step: int, say: Callable[[str], None]) -> None:
        """Drop the records after `step`, naming how many and from which step on (via `say`)."""
        if not self.path.is_file():
            return
        records = read_records(self.path)
        kept = [record for record in records if record["step"] <= step]
        if len(kept) == len(records):
            return
        dropped = [record["step"] for record in records if record["step"] > step]
        say(f"{self.path}: resuming at step {step}: dropping {len(dropped)} record(s) of steps "
            f"{min(dropped)}-{max(dropped)}, which will be trained and logged again")
        write_text_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def scalars(self, split: str, step: int, epoch: int, values: dict[str, float]) -> None:
        """Append one record and its TensorBoard scalars."""
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": step, "epoch": epoch, "split": split}
        record.update({name: _json_number(value) for name, value in values.items()})
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        assert self.writer is not None
        for name, value in values.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """Log a [3, H, W] image in [0, 1] to TensorBoard."""
        if self.enabled:
            assert self.writer is not None
            self.writer.add_image(tag, grid.clamp(0, 1), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` in order.

    A truncated last line (a run killed mid-write) is skipped; any other unreadable line is a
    ValueError naming file and line.
    """
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON record ({err})") from None
    return records


def _json_number(value: float) -> float | str:
    """JSON has no NaN/inf: write them as strings so the file stays valid JSON."""
    value = float(value)
    return value if math.isfinite(value) else str(value)
