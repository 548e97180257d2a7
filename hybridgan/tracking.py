"""Rank-0 metrics: `metrics.jsonl` (one JSON object per record, the record of the run) and the
experiment trackers of `tracking.backends`, through Accelerate (`Accelerator(log_with=...)`).

Records carry `step`, `epoch` and `split` ("train", "epoch", "val", "test") plus scalars; the same
scalars go to every tracker as `<split>/<name>` (`accelerator.log`), and image grids to each
tracker's own image call (`IMAGE_LOGGERS`: Accelerate has no image call common to all trackers).
TensorBoard writes `<stage>/tb`; the other trackers name their experiment or project after
`run.name` and, where they have runs, the run after the stage. On resume from step N, records after
N (steps that will be trained again) are dropped from `metrics.jsonl`, saying how many, and
TensorBoard purges them likewise, so every number in the run folder belongs to the weights that the
checkpoints hold; the other trackers start a new run at each launch. Nothing else is ever removed:
records up to N stay. The resolved config goes to every tracker as the run's hyperparameters
(TensorBoard's, as Accelerate writes them, in `tb/<time>/` with an `hparams.yml`).

A tracker whose package is not installed is an error when the stage starts (`TrackerError`, one
line naming it and the package to install), not a silent omission: Accelerate itself drops such a
tracker with a debug message.

Append-only JSON-lines files (`metrics.jsonl`, `launches.jsonl`) are appended one whole line per
write; a crash mid-write can leave a last line without its newline, which the next record would be
glued onto. `set_aside_torn_line`, called before a run appends to such a file, moves that line into
`NAME.torn-K` (naming it), so the file goes on with whole records only.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, TensorBoardTracker, get_available_trackers

from hybridgan.atomic import write_text_atomic

TENSORBOARD_DIR = "tb"
"""TensorBoard's folder inside the stage folder."""

PIP_NAMES = {"comet_ml": "comet-ml"}
"""pip package of a tracker, where it is not the tracker's name."""


class TrackerError(ValueError):
    """A tracker that cannot run here (its package is missing); one line names it."""


class StageTensorBoard(TensorBoardTracker):
    """Accelerate's TensorBoard tracker writing `<stage_dir>/tb` whatever the project name, and
    purging, on resume, the steps after the checkpoint (`resume_at`)."""

    def __init__(self, stage_dir: Path) -> None:
        super().__init__(TENSORBOARD_DIR, str(stage_dir))

    def resume_at(self, step: int) -> None:
        """Before `start`: drop the events of steps after `step` (0: a fresh run, nothing to drop)."""
        self.init_kwargs["purge_step"] = step + 1 if step > 0 else None


def stage_trackers(backends: list[str], run_name: str, stage_dir: Path) -> list[GeneralTracker]:
    """The Accelerate trackers of `tracking.backends` for one stage folder, for `Accelerator(log_with=...)`.

    TrackerError naming the first backend whose package is not installed in this environment.
    """
    available = {str(tracker) for tracker in get_available_trackers()}
    for name in backends:
        if name not in available:
            raise TrackerError(f"tracking.backends: {name!r} is not installed in this environment "
                               f"({sys.executable}): pip install {PIP_NAMES.get(name, name)}, or remove "
                               f"{name} from tracking.backends")
    return [_stage_tracker(name, run_name, stage_dir) for name in backends]


def _stage_tracker(name: str, run_name: str, stage_dir: Path) -> GeneralTracker:
    """One tracker: experiment/project `run_name`; MLflow and W&B runs named after the stage."""
    if name == "tensorboard":
        return StageTensorBoard(stage_dir)
    tracker_class = LOGGER_TYPE_TO_CLASS[name]
    if name == "mlflow":
        return tracker_class(experiment_name=run_name, run_name=stage_dir.name)
    if name == "wandb":
        return tracker_class(run_name, name=stage_dir.name)
    if tracker_class.requires_logging_directory:
        return tracker_class(run_name, str(stage_dir.parent))
    return tracker_class(run_name)


def flat_config(values: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config as dotted keys with scalar values (lists as their text), what trackers take
    as hyperparameters."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def _hwc_uint8(grid: torch.Tensor) -> np.ndarray:
    """A [3, H, W] image in [0, 1] as an [H, W, 3] uint8 array."""
    return (grid.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def _mlflow_image(tracker: GeneralTracker, tag: str, grid: torch.Tensor, step: int) -> None:
    import mlflow

    mlflow.log_image(_hwc_uint8(grid), key=tag, step=step)


IMAGE_LOGGERS: dict[str, Callable[[GeneralTracker, str, torch.Tensor, int], None]] = {
    "tensorboard": lambda tracker, tag, grid, step: tracker.log_images({tag: grid.clamp(0, 1)}, step=step,
                                                                       dataformats="CHW"),
    "mlflow": _mlflow_image,
    "wandb": lambda tracker, tag, grid, step: tracker.log_images({tag: [_hwc_uint8(grid)]}, step=step),
    "swanlab": lambda tracker, tag, grid, step: tracker.log_images({tag: [_hwc_uint8(grid)]}, step=step),
    "aim": lambda tracker, tag, grid, step: tracker.log_images({tag: _hwc_uint8(grid)}, step=step),
    "clearml": lambda tracker, tag, grid, step: tracker.log_images({tag: _hwc_uint8(grid)}, step=step),
}
"""How each tracker takes an image grid; the others (comet_ml, dvclive, trackio) get the scalars only."""


class MetricsLogger:
    """Writes metrics and images on the main process of `accelerator`; a no-op on other ranks and
    without an accelerator (a session not started yet).

    `config` (flat, `flat_config`) goes to the trackers as the run's hyperparameters.
    """

    def __init__(self, stage_dir: Path, accelerator: Accelerator | None, resume_step: int = 0,
                 say: Callable[[str], None] = print, config: dict[str, Any] | None = None) -> None:
        self.accelerator = accelerator
        self.enabled = accelerator is not None and accelerator.is_main_process
        self.path = stage_dir / "metrics.jsonl"
        if not self.enabled:
            return
        assert accelerator is not None
        stage_dir.mkdir(parents=True, exist_ok=True)
        set_aside_torn_line(self.path, say)
        self._drop_records_after(resume_step, say)
        for tracker in accelerator.log_with:
            if isinstance(tracker, StageTensorBoard):
                tracker.resume_at(resume_step)
        accelerator.init_trackers(stage_dir.parent.name, config=config)

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
        """Append one record, and send its scalars to every tracker as `<split>/<name>`."""
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": step, "epoch": epoch, "split": split}
        record.update({name: _json_number(value) for name, value in values.items()})
        append_record(self.path, record)
        assert self.accelerator is not None
        self.accelerator.log({f"{split}/{name}": float(value) for name, value in values.items()}, step=step)

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """Log a [3, H, W] image in [0, 1] to every tracker that takes images."""
        if not self.enabled:
            return
        assert self.accelerator is not None
        for tracker in self.accelerator.trackers:
            if tracker.name in IMAGE_LOGGERS:
                IMAGE_LOGGERS[tracker.name](tracker, tag, grid, step)

    def close(self) -> None:
        """End the trackers' runs (once; the process group stays, unlike `accelerator.end_training`)."""
        if self.accelerator is None or not self.enabled:
            return
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []


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
