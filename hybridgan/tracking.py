"""Rank-0 metrics: `metrics.jsonl` (one JSON object per record) and TensorBoard events under `tb/`.

Records carry `step`, `epoch` and `split` ("train", "epoch", "val", "test") plus scalars; the same
scalars go to TensorBoard as `<split>/<name>`. On resume from step N, records after N (steps that
will be trained again) are dropped from `metrics.jsonl`, saying how many, and TensorBoard purges
them likewise, so every number in the run folder belongs to the weights that the checkpoints hold.
Nothing else is ever removed: records up to N stay.

Append-only JSON-lines files (`metrics.jsonl`, `launches.jsonl`) are appended one whole line per
write; a crash mid-write can leave a last line without its newline, which the next record would be
glued onto. `set_aside_torn_line`, called before a run appends to such a file, moves that line into
`NAME.torn-K` (naming it), so the file goes on with whole records only.
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
        set_aside_torn_line(self.path, say)
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
        append_record(self.path, record)
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


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append `record` to a JSON-lines file as one line, in one write."""
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def set_aside_torn_line(path: Path, say: Callable[[str], None] = print) -> Path | None:
    """Make a JSON-lines file end with a whole line before anything is appended to it: a last line
    without its newline (a crash mid-write) is completed when it is a whole JSON record, else moved
    into `NAME.torn-K` (the first free K), named through `say`; returns that file or None."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return None
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
    except ValueError:
        pass
    else:
        with path.open("ab") as handle:
            handle.write(b"\n")
        return None
    aside = next(candidate for k in range(1, 1 << 20)
                 if not (candidate := path.with_name(f"{path.name}.torn-{k}")).exists())
    aside.write_bytes(data[cut:])
    write_text_atomic(path, data[:cut].decode())
    say(f"{path}: its last line was cut mid-write (a crash); moved to {aside.name}, the run goes on")
    return aside


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
