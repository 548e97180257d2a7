"""metrics.jsonl on resume: records past the checkpoint dropped, a line cut by a kill tolerated;
the trackers of `tracking.backends` through Accelerate (TensorBoard and MLflow read back)."""

from __future__ import annotations

import json

import pytest
from accelerate import Accelerator

from hybridgan.tracking import MetricsLogger, StageTensorBoard, append_record, read_records, set_aside_torn_line


def logger_in(stage_dir, resume_step=0, say=print) -> MetricsLogger:
    """A MetricsLogger of a one-process CPU Accelerator writing TensorBoard into `stage_dir`."""
    accelerator = Accelerator(cpu=True, log_with=[StageTensorBoard(stage_dir)])
    return MetricsLogger(stage_dir, accelerator, resume_step=resume_step, say=say)


def test_resume_drops_later_records_and_a_truncated_last_line(tmp_path):
    lines = [json.dumps({"step": s, "epoch": 1, "split": "train", "loss": 0.5}) for s in (2, 4, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 8, "epo')
    said = []
    logger = logger_in(tmp_path, 4, said.append)
    logger.scalars("train", 6, 1, {"loss": 0.25})
    assert said == [f"{tmp_path / 'metrics.jsonl'}: its last line was cut mid-write (a crash); moved to "
                    "metrics.jsonl.torn-1, the run goes on",
                    f"{tmp_path / 'metrics.jsonl'}: resuming at step 4: dropping 1 record(s) of steps 6-6, "
                    "which will be trained and logged again"]
    assert (tmp_path / "metrics.jsonl.torn-1").read_text() == '{"step": 8, "epo'
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_records(tmp_path / "metrics.jsonl")] == [(2, 0.5), (4, 0.5), (6, 0.25)]


def test_a_bad_line_inside_the_log_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=f"^{path}:2: not a JSON record"):
        logger_in(tmp_path, 1)


def test_resume_at_the_last_record_drops_nothing_and_says_nothing(tmp_path):
    lines = [json.dumps({"step": s, "epoch": 1, "split": "train", "loss": 0.5}) for s in (2, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    said = []
    logger_in(tmp_path, 4, said.append).close()
    assert said == [] and len(read_records(tmp_path / "metrics.jsonl")) == 2


def test_a_torn_last_line_is_set_aside_even_when_no_record_is_dropped_and_the_next_record_stays_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "epoch": 1, "split": "train", "loss": 0.5}) for s in (2, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "ep')
    (tmp_path / "metrics.jsonl.torn-1").write_text("an earlier one")
    said = []
    logger = logger_in(tmp_path, 6, said.append)
    logger.scalars("train", 6, 1, {"loss": 0.25})
    logger.close()
    assert said == [f"{path}: its last line was cut mid-write (a crash); moved to metrics.jsonl.torn-2, the run goes on"]
    assert (tmp_path / "metrics.jsonl.torn-2").read_text() == '{"step": 6, "ep'
    assert (tmp_path / "metrics.jsonl.torn-1").read_text() == "an earlier one"
    assert [r["step"] for r in read_records(path)] == [2, 4, 6]
    logger_in(tmp_path, 6, said.append).close()  # the next run resumes
    assert len(said) == 1


def test_a_whole_last_record_without_its_newline_is_completed_not_set_aside(tmp_path):
    path = tmp_path / "launches.jsonl"
    path.write_text('{"start_step": 0}\n{"start_step": 4}')
    assert set_aside_torn_line(path, print) is None
    append_record(path, {"start_step": 8})
    assert [json.loads(line)["start_step"] for line in path.read_text().splitlines()] == [0, 4, 8]


def test_a_tracker_accelerate_does_not_have_or_named_twice_is_a_config_error():
    from hybridgan.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^tracking.backends: 'neptune' is not one of Accelerate's trackers "
                                          r"\(aim, tensorboard, wandb, .*mlflow"):
        load_config(None, ["tracking.backends=[tensorboard,neptune]"])
    with pytest.raises(ConfigError, match=r"^tracking.backends: 'mlflow' is named twice$"):
        load_config(None, ["tracking.backends=[mlflow,mlflow]"])
    assert load_config(None, ["tracking.backends=[]"]).tracking.backends == []
    assert load_config(None).tracking.backends == ["tensorboard"]


def test_a_tracker_not_installed_stops_the_stage_at_its_start_in_one_line(tiny_shards, tmp_path, monkeypatch, capsys):
    import sys

    from conftest import tiny_args
    from hybridgan.pretrain import main

    monkeypatch.setattr("hybridgan.tracking.get_available_trackers", lambda: ["tensorboard"])
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args(tiny_shards, tmp_path, "tracking.backends=[tensorboard,wandb]"))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (f"error: tracking.backends: 'wandb' is not installed in this environment "
                                       f"({sys.executable}): pip install wandb, or remove wandb from tracking.backends\n")
    assert not (tmp_path / "t" / "pretrain" / "metrics.jsonl").exists()


def test_scalars_and_image_grids_reach_tensorboard_and_mlflow(tiny_shards, tmp_path, monkeypatch):
    """A tiny pretraining with `tracking.backends=[tensorboard,mlflow]` (MLflow's local file store):
    every scalar of metrics.jsonl is in both at its step, the blur grid too, and the config is
    MLflow's run parameters."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import tiny_config
    from hybridgan.pretrain import pretrain

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.13 asks for it
    stage = pretrain(tiny_config(tiny_shards, tmp_path, "tracking.backends=[tensorboard,mlflow]")).parent
    records = read_records(stage / "metrics.jsonl")
    expected = {(f"{r['split']}/{key}", r["step"]): value for r in records for key, value in r.items()
                if key not in ("step", "epoch", "split") and isinstance(value, float)}
    assert {"train/disc_loss", "epoch/disc_loss", "test/test_accuracy"} <= {tag for tag, _ in expected}

    client = MlflowClient()
    experiment = client.get_experiment_by_name("t")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "pretrain" and run.info.status == "FINISHED"
    assert run.data.params["pretrain.batch_size"] == "8" and run.data.params["tracking.backends"] == "['tensorboard', 'mlflow']"
    logged = {(tag, m.step): m.value for tag, _ in expected for m in client.get_metric_history(run.info.run_id, tag)}
    assert logged == pytest.approx(expected, rel=1e-6)
    test_step = next(r["step"] for r in records if r["split"] == "test")
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(path.startswith(f"images/test~original_blurred_pixelmap+step+{test_step}+") and path.endswith(".png")
               for path in images), images

    events = EventAccumulator(str(stage / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {(tag, e.step): e.value for tag, _ in expected for e in events.Scalars(tag)} == pytest.approx(expected, rel=1e-6)
    assert [e.step for e in events.Images("test/original_blurred_pixelmap")] == [test_step]


def test_a_resume_may_change_the_trackers(tiny_shards, tmp_path):
    from conftest import tiny_config
    from hybridgan.pretrain import pretrain

    pretrain(tiny_config(tiny_shards, tmp_path, "pretrain.max_steps=2", "pretrain.log_every=1"))
    stage = pretrain(tiny_config(tiny_shards, tmp_path, "pretrain.max_steps=3", "pretrain.log_every=1",
                                 "tracking.backends=[]")).parent
    assert [r["step"] for r in read_records(stage / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(stage / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/disc_loss")] == [1, 2]  # the second launch logged no TensorBoard


@pytest.mark.parametrize("name, as_list", [("wandb", True), ("swanlab", True), ("aim", False), ("clearml", False)])
def test_an_image_grid_reaches_each_trackers_log_images_in_the_form_it_takes(name, as_list):
    """Accelerate's `log_images` of W&B and SwanLab take a list of images per tag, Aim's and
    ClearML's one image; each gets the grid as [H, W, 3] uint8."""
    import numpy as np
    import torch
    from accelerate.tracking import GeneralTracker

    from hybridgan.tracking import IMAGE_LOGGERS

    class Recorder(GeneralTracker):
        requires_logging_directory = False
        tracker = None

        def __init__(self) -> None:
            self.name = name
            super().__init__()
            self.calls = []

        def log_images(self, values, step=None, **kwargs):
            self.calls.append((values, step))

    grid = torch.tensor([0.0, 0.5, 1.0, 2.0]).repeat(3, 2, 1)  # [3, 2, 4], one value above 1
    recorder = Recorder()
    IMAGE_LOGGERS[name](recorder, "val/grid", grid, 7)
    [(values, step)] = recorder.calls
    image = values["val/grid"][0] if as_list else values["val/grid"]
    assert step == 7 and list(values) == ["val/grid"] and isinstance(values["val/grid"], list) is as_list
    assert image.dtype == np.uint8 and image.shape == (2, 4, 3)
    assert image[1, :, 0].tolist() == [0, 128, 255, 255]
