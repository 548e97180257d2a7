"""The training session: stage-folder lock, read-only folders, config on resume, resume without a
pointer, SIGINT, global batch on 1 and 2 ranks and resume onto another world size, the cadence in
minutes (one and two ranks), checkpoints written in the background."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import hybridgan.session
from conftest import tiny_args, tiny_config
from hybridgan import checkpoint
from hybridgan.checkpoint import verify_manifest
from hybridgan.config import load_config, scaled_lr
from hybridgan.pretrain import pretrain
from hybridgan.session import EXIT_REQUEUE, TrainingError, TrainingSession, build_adam, stage_lr
from hybridgan.train import GanTraining, train
from stage_runs import (REPO, accelerate_2_ranks, failure, kill_after_checkpoint, latest_step, launches,
                        read_records, run_stage, stage_env, wait_for)

SHORT = ["pretrain.max_steps=4", "pretrain.checkpoint_every=2", "pretrain.eval_batches=0"]


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and lines and lines[-1].startswith("error: "), failure(result)
    assert "Traceback" not in result.stderr
    return lines[-1]


def test_a_second_process_on_a_busy_stage_folder_is_refused_naming_the_holder(tiny_shards, tmp_path):
    stage = tmp_path / "t" / "pretrain"
    # the holder forks a child that outlives it, as DataLoader workers may outlive a killed main process
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time; from pathlib import Path; from hybridgan.lock import StageLock; "
         "lock = StageLock(Path(sys.argv[1])); lock.acquire(); child = os.fork(); "
         "child or time.sleep(600); print('locked', child, flush=True); time.sleep(600)", str(stage)],
        cwd=REPO, env=dict(stage_env(), SLURM_JOB_ID="4242"), stdout=subprocess.PIPE, text=True)
    try:
        word, child = holder.stdout.readline().split()
        assert word == "locked"
        refused = run_stage("hybridgan.pretrain", tiny_args(tiny_shards, tmp_path, *SHORT))
        line = _error_line(refused)
        assert str(stage) in line and f"pid {holder.pid}" in line and "Slurm job 4242" in line
        assert not (stage / "checkpoints").exists() and not (stage / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    try:
        # the kernel released the killed holder's lock, its living child holds nothing: no stale lock
        after = run_stage("hybridgan.pretrain", tiny_args(tiny_shards, tmp_path, *SHORT))
        assert after.returncode == 0, failure(after)
        assert latest_step(stage) == 4
    finally:
        assert int(child) > 0
        os.kill(int(child), signal.SIGKILL)


def test_a_read_only_run_root_is_one_line_naming_the_path(tiny_shards, tmp_path):
    if os.geteuid() == 0:  # root writes through file modes; /sys is a read-only file system
        root = Path("/sys/hybridgan-runs")
    else:
        root = tmp_path / "read-only"
        root.mkdir(mode=0o555)
    result = run_stage("hybridgan.pretrain", tiny_args(tiny_shards, root, *SHORT))
    assert str(root) in _error_line(result)


def test_resume_accepts_scheduling_and_a_longer_run_and_refuses_the_rest_by_name(tiny_shards, tmp_path, capsys):
    pretrain(tiny_config(tiny_shards, tmp_path, *SHORT))
    stage = tmp_path / "t" / "pretrain"
    for change, named in (("pretrain.lr=0.01", "pretrain.lr"), ("pretrain.max_steps=3", "pretrain.max_steps (may only"),
                          ("pretrain.batch_size=4", "pretrain.batch_size")):
        with pytest.raises(TrainingError, match=named.replace("(", r"\(")):
            pretrain(tiny_config(tiny_shards, tmp_path, *SHORT, change))
    capsys.readouterr()
    pretrain(tiny_config(tiny_shards, tmp_path, *SHORT, "pretrain.max_steps=6", "pretrain.log_every=3",
                         "data.workers=1", "train.lr=0.5"))
    out = capsys.readouterr().out
    assert out.count("accepted on resume") == 1
    assert "pretrain.log_every 2 -> 3" in out and "pretrain.max_steps 4 -> 6" in out and "data.workers 0 -> 1" in out
    saved = OmegaConf.load(stage / "config.yaml")
    assert (saved.pretrain.max_steps, saved.pretrain.log_every, saved.data.workers) == (6, 3, 1)
    assert saved.train.lr == tiny_config(tiny_shards, tmp_path).train.lr  # the other stage's keys are not taken
    assert [r["start_step"] for r in launches(stage)] == [0, 4]
    assert latest_step(stage) == 6


def test_resume_of_a_folder_written_before_a_key_existed_reads_it_as_its_default(tiny_shards, tmp_path, capsys):
    pretrain(tiny_config(tiny_shards, tmp_path, *SHORT))
    path = tmp_path / "t" / "pretrain" / "config.yaml"
    older = OmegaConf.load(path)
    del older.data["resident"], older.pretrain["checkpoint_every_minutes"], older.discriminator["pathak_input"]
    path.write_text(OmegaConf.to_yaml(older))
    capsys.readouterr()
    pretrain(tiny_config(tiny_shards, tmp_path, *SHORT, "pretrain.max_steps=6", "data.resident=true"))
    out = capsys.readouterr().out
    assert "data.resident False -> True" in out and "checkpoint_every_minutes" not in out
    saved = OmegaConf.load(path)
    assert saved.data.resident is True and saved.pretrain.checkpoint_every_minutes == 0
    assert saved.discriminator.pathak_input == "hole"
    assert latest_step(tmp_path / "t" / "pretrain") == 6


def test_resume_without_the_latest_pointer_keeps_every_logged_record(tiny_shards, tmp_path, capsys):
    pretrain(tiny_config(tiny_shards, tmp_path, *SHORT))
    stage = tmp_path / "t" / "pretrain"
    before = read_records(stage, "train")
    (stage / "checkpoints" / "latest").unlink()
    pretrain(tiny_config(tiny_shards, tmp_path, *SHORT, "pretrain.max_steps=6"))
    assert "latest: missing" in capsys.readouterr().out
    assert [r["start_step"] for r in launches(stage)] == [0, 4]
    assert read_records(stage, "train")[: len(before)] == before
    assert [r["step"] for r in read_records(stage, "train")] == [2, 4, 6]


def test_sigint_checkpoints_the_current_step_and_exits_75(tiny_shards, tmp_path):
    args = tiny_args(tiny_shards, tmp_path, "pretrain.epochs=20", "pretrain.checkpoint_every=2",
                     "pretrain.eval_batches=0")
    stage = tmp_path / "t" / "pretrain"
    proc = kill_after_checkpoint("hybridgan.pretrain", args, stage, min_step=2, sig=signal.SIGINT)
    output = proc.stdout.read()
    assert proc.returncode == EXIT_REQUEUE, output[-2000:]
    stopped_at = latest_step(stage)
    assert f"signal {int(signal.SIGINT)}: checkpointed {stage} at step {stopped_at}" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert read_records(stage, "train")[-1]["step"] == stopped_at


def test_global_batch_per_rank_and_the_lr_rule():
    cfg = load_config(None, ["train.batch_size=64", "train.lr=0.0008"])
    assert scaled_lr(cfg.train) == pytest.approx(0.0008)
    linear = load_config(None, ["train.batch_size=64", "train.lr=0.0008", "train.lr_scaling=linear"])
    assert scaled_lr(linear.train) == pytest.approx(0.0032)
    sqrt = load_config(None, ["train.batch_size=64", "train.lr=0.0008", "train.lr_scaling=sqrt"])
    assert scaled_lr(sqrt.train) == pytest.approx(0.0016)
    adam = build_adam(torch.nn.Linear(2, 2), sqrt.train)
    assert adam.param_groups[0]["lr"] == pytest.approx(0.0016) and adam.param_groups[0]["fused"]


def test_the_lr_warms_up_then_follows_a_half_cosine_to_zero():
    cfg = load_config(None, ["pretrain.lr=0.001", "pretrain.warmup_steps=4", "pretrain.lr_decay=cosine"]).pretrain
    lrs = [stage_lr(cfg, step, total_steps=12) for step in range(13)]
    assert lrs[:4] == pytest.approx([0.00025, 0.0005, 0.00075, 0.001])
    assert lrs[4] == pytest.approx(0.001) and lrs[8] == pytest.approx(0.0005) and lrs[12] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    constant = load_config(None, ["pretrain.lr=0.001"]).pretrain
    assert {stage_lr(constant, step, total_steps=12) for step in range(12)} == {0.001}


@pytest.mark.slow
def test_one_and_two_ranks_take_the_same_steps_per_epoch_and_resume_onto_two_ranks(tiny_shards, tmp_path):
    """Global batch 8: one rank x 8 images, then a resume on two real gloo ranks x 4 images, the
    same 64 // 8 = 8 optimiser steps per epoch and an exact epoch mean over the change."""
    pretrain(tiny_config(tiny_shards, tmp_path, "pretrain.max_steps=4", "pretrain.checkpoint_every=2",
                         "pretrain.eval_batches=0"))
    stage = tmp_path / "t" / "pretrain"
    resumed = run_stage("hybridgan.pretrain", tiny_args(tiny_shards, tmp_path, "pretrain.checkpoint_every=2",
                                                        "pretrain.eval_batches=0"), launcher=accelerate_2_ranks())
    assert resumed.returncode == 0, failure(resumed)
    first, second = launches(stage)
    assert (first["world_size"], first["batch_size_per_rank"], first["total_steps"]) == (1, 8, 4)
    assert (second["world_size"], second["batch_size_per_rank"], second["total_steps"]) == (2, 4, 8)
    assert second["resumed_from"] == {"world_size": 1, "batch_size_per_rank": 8} and second["start_step"] == 4
    assert "written by 1 rank(s) x 8 images, resumed on 2 x 4" in resumed.stdout
    train = read_records(stage, "train")
    partial, epoch = read_records(stage, "epoch")  # the first run's end inside the epoch, then the whole epoch
    assert (partial["step"], epoch["step"]) == (4, 8) and [r["step"] for r in train] == [2, 4, 6, 8]
    # each train record is the mean over ranks of 2 steps, so the epoch's mean is the records' mean
    expected = sum(r["disc_loss"] for r in train) / len(train)
    assert epoch["disc_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_grad_clip_bounds_the_gradient_norm_only_when_asked(tiny_shards, tmp_path, clip):
    cfg = tiny_config(tiny_shards, tmp_path, f"pretrain.grad_clip={clip}")
    session = TrainingSession(cfg, "pretrain", cfg.pretrain)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    model, optimizer = session.prepare("disc", model, build_adam(model, cfg.pretrain))
    session.optimize((model(torch.full((4, 8), 10.0)) ** 2).mean(), model, optimizer)
    session.close()
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    if clip:
        assert norm == pytest.approx(clip, rel=1e-4)
    else:
        assert norm > 1.0


def test_one_image_per_rank_is_refused_naming_the_batch_before_anything_is_written(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path, "pretrain.batch_size=1")
    with pytest.raises(TrainingError) as err:
        TrainingSession(cfg, "pretrain", cfg.pretrain)
    assert "pretrain.batch_size=1 (the global batch) on world size 1 leaves 1 image per rank" in str(err.value)
    assert not (tmp_path / "t").exists()


def _checkpoint_steps(stage: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (stage / "checkpoints").glob("step-*"))


def test_checkpoints_and_evaluations_come_at_the_steps_the_minutes_say(tiny_shards, tmp_path, monkeypatch):
    """A fake clock: 20 s per training step. Checkpoints every 4 steps or every minute, evaluation
    every 3 steps or every half minute; a step-based checkpoint or evaluation restarts its minutes."""
    now = [0.0]
    honest_step, honest_validate = GanTraining.step, GanTraining.validate
    evaluated: list[int] = []

    def step(self, batch):
        now[0] += 20.0
        return honest_step(self, batch)

    def validate(self):
        evaluated.append(self.session.state.step)
        return honest_validate(self)

    monkeypatch.setattr(hybridgan.session, "clock", lambda: now[0])
    monkeypatch.setattr(GanTraining, "step", step)
    monkeypatch.setattr(GanTraining, "validate", validate)
    train(tiny_config(tiny_shards, tmp_path, "discriminator.from_scratch=true", "train.max_steps=8",
                      "train.checkpoint_every=4", "train.checkpoint_every_minutes=1", "train.eval_every=3",
                      "train.eval_every_minutes=0.5", "train.keep_checkpoints=10"))
    # checkpoints: 3 (60 s), 4 (every 4 steps, restarts the minute), 7 (60 s after step 4), 8 (the epoch's end)
    assert _checkpoint_steps(tmp_path / "t" / "train-hybrid") == [3, 4, 7, 8]
    # evaluations: 2 (40 s), 3 (every 3 steps), 5 (40 s after step 3), 6, 8 (40 s after 6, and the epoch's end)
    assert sorted(set(evaluated)) == [2, 3, 5, 6, 8]


@pytest.mark.slow
def test_two_ranks_checkpoint_the_same_step_when_only_rank_0s_clock_says_it_is_due(tiny_shards, tmp_path):
    """Rank 0's fake clock runs 20 s per step, rank 1's stands still; the ranks agree at log steps
    (every 2), so the minute comes due at step 4 for both (`checkpoint_every=0`: not by steps)."""
    args = tiny_args(tiny_shards, tmp_path, "pretrain.max_steps=8", "pretrain.checkpoint_every=0",
                     "pretrain.checkpoint_every_minutes=1", "pretrain.eval_batches=0")
    result = subprocess.run([*accelerate_2_ranks(), str(REPO / "tests" / "clock_on_rank0.py"), *args], cwd=REPO,
                            env=stage_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, failure(result)
    stage = tmp_path / "t" / "pretrain"
    assert [record["world_size"] for record in launches(stage)] == [2]
    assert _checkpoint_steps(stage) == [4, 8]
    step_4 = stage / "checkpoints" / "step-00000004"
    manifest = json.loads((step_4 / "manifest.json").read_text())
    names = {entry["name"] for entry in manifest["files"]}
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= names  # both ranks saved step 4
    assert manifest["saved_with"]["world_size"] == 2


def test_the_step_goes_on_while_the_checkpoint_is_written_and_finish_waits_for_it(tiny_shards, tmp_path, monkeypatch):
    """The writer of each checkpoint waits (up to 30 s) until the session's checkpoint calls for its
    step have returned (step 2: the step's; step 4: the step's and finish()'s): a save that waited
    for its writer would show up as a write before a return."""
    events: list[tuple[str, int]] = []
    returned: dict[int, threading.Event] = collections.defaultdict(threading.Event)
    calls_per_step = {2: 1, 4: 2}
    honest_writer, honest_checkpoint = checkpoint.write_snapshot, TrainingSession.checkpoint

    def held_writer(snapshot, folder):
        step = int(folder.name.split("-")[-1])
        returned[step].wait(timeout=30)
        honest_writer(snapshot, folder)
        events.append(("written", step))

    def checkpoint_call(self):
        honest_checkpoint(self)
        events.append(("returned", self.state.step))
        if events.count(("returned", self.state.step)) == calls_per_step[self.state.step]:
            returned[self.state.step].set()

    monkeypatch.setattr(checkpoint, "write_snapshot", held_writer)
    monkeypatch.setattr(TrainingSession, "checkpoint", checkpoint_call)
    pretrain(tiny_config(tiny_shards, tmp_path, *SHORT))
    stage = tmp_path / "t" / "pretrain"
    # the last step's checkpoint, then finish()'s call (nothing left to save), and finish() waited for the write
    assert events == [("returned", 2), ("written", 2), ("returned", 4), ("returned", 4), ("written", 4)]
    assert latest_step(stage) == 4 and verify_manifest(stage / "checkpoints" / "step-00000004") is None


def test_a_failed_background_write_stops_the_run_naming_it_and_a_rerun_resumes_from_the_previous(
        tiny_shards, tmp_path, monkeypatch, capsys):
    honest_writer = checkpoint.write_snapshot

    def writer_failing_at_step_4(snapshot, folder):
        if folder.name.endswith("-00000004"):
            raise OSError(28, "No space left on device")
        honest_writer(snapshot, folder)

    monkeypatch.setattr(checkpoint, "write_snapshot", writer_failing_at_step_4)
    with pytest.raises(TrainingError) as err:
        pretrain(tiny_config(tiny_shards, tmp_path, *SHORT, "pretrain.max_steps=6"))
    stage = tmp_path / "t" / "pretrain"
    assert f"{stage}/checkpoints/.partial-step-00000004: writing the checkpoint failed" in str(err.value)
    assert latest_step(stage) == 2
    monkeypatch.undo()
    capsys.readouterr()
    pretrain(tiny_config(tiny_shards, tmp_path, *SHORT, "pretrain.max_steps=6"))
    assert "from step-00000002 (step 2)" in capsys.readouterr().out
    assert latest_step(stage) == 6


def test_a_kill_during_the_background_write_leaves_the_previous_checkpoint_latest_and_resumable(
        tiny_shards, tmp_path, capsys):
    args = tiny_args(tiny_shards, tmp_path, *SHORT, "pretrain.max_steps=6")
    stage = tmp_path / "t" / "pretrain"
    partial = stage / "checkpoints" / ".partial-step-00000004"
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "held_writer.py"), *args], cwd=REPO,
                            env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: (partial / "model.safetensors").is_file() or proc.poll() is not None, 120,
                 "the held write of step 4")
        assert proc.poll() is None, proc.stdout.read()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert latest_step(stage) == 2 and not (partial / "manifest.json").exists()
    assert _checkpoint_steps(stage) == [2]
    capsys.readouterr()
    pretrain(tiny_config(tiny_shards, tmp_path, *SHORT, "pretrain.max_steps=6"))
    assert "from step-00000002 (step 2)" in capsys.readouterr().out
    assert latest_step(stage) == 6 and not partial.exists()


def test_a_non_finite_batchnorm_statistic_stops_the_run_before_its_checkpoint_and_export(tiny_shards, tmp_path,
                                                                                        monkeypatch):
    from hybridgan.pretrain import EXPORT_NAME, BlurPretraining

    honest_step = BlurPretraining.step
    poisoned: list[str] = []

    def diverging_step(self, batch):
        losses = honest_step(self, batch)
        if self.session.state.step == 2:  # the 3rd step: BatchNorm's variance overflows, no loss shows it
            name, buffer = next((n, b) for n, b in self.disc.named_buffers() if n.endswith("running_var"))
            buffer.fill_(float("inf"))
            poisoned.append(name)
        return losses

    monkeypatch.setattr(BlurPretraining, "step", diverging_step)
    with pytest.raises(TrainingError) as err:
        pretrain(tiny_config(tiny_shards, tmp_path, *SHORT))
    stage = tmp_path / "t" / "pretrain"
    assert str(err.value) == (f"step 4: disc.{poisoned[0]} holds NaN or an infinity; stopped, the last good "
                              f"checkpoint {stage / 'checkpoints' / 'step-00000002'} is kept")
    assert latest_step(stage) == 2 and not (stage / EXPORT_NAME).exists()


def test_a_non_finite_gradient_norm_with_a_finite_loss_stops_the_run_naming_the_model(tiny_shards, tmp_path):
    cfg = tiny_config(tiny_shards, tmp_path)
    session = TrainingSession(cfg, "pretrain", cfg.pretrain)
    model = torch.nn.Linear(8, 1)
    model, optimizer = session.prepare("disc", model, build_adam(model, cfg.pretrain))
    loss = (model.weight.abs() * 0).sqrt().sum()  # 0, with an infinite slope
    session.optimize(loss, model, optimizer)
    session.state.step = 1
    session.losses.pending.append((1, {"disc_loss": loss.detach()}))
    with pytest.raises(TrainingError, match="^step 1: the gradient norm of disc is nan; stopped, no checkpoint"):
        session.flush_losses(0)


def test_a_stage_that_fails_before_its_first_step_pins_no_config_and_a_bad_one_is_named(tiny_shards, tmp_path,
                                                                                       capsys):
    failed = run_stage("hybridgan.pretrain", tiny_args(tiny_shards, tmp_path, *SHORT, "data.shards=/nonexistent"))
    assert "/nonexistent" in _error_line(failed)
    stage = tmp_path / "t" / "pretrain"
    assert not (stage / "config.yaml").exists()
    (stage / "launches.jsonl").write_text('{"time": "2026-01-01T00:00:00", "start_st')  # a crash mid-write
    pretrain(tiny_config(tiny_shards, tmp_path, *SHORT))  # the corrected command is not refused
    assert latest_step(stage) == 4 and (stage / "config.yaml").is_file()
    assert f"{stage / 'launches.jsonl'}: its last line was cut mid-write (a crash); moved to launches.jsonl.torn-1" \
        in capsys.readouterr().out
    assert [r["start_step"] for r in launches(stage)] == [0]
    for text, why in (("pretrain: [1, 2\n", "not a readable run config (while parsing a flow sequence"),
                      ("- 1\n- 2\n", "not a readable run config (holds a list, not a mapping of keys)")):
        (stage / "config.yaml").write_text(text)
        with pytest.raises(TrainingError) as err:
            pretrain(tiny_config(tiny_shards, tmp_path, *SHORT, "pretrain.max_steps=6"))
        assert str(err.value).startswith(f"{stage / 'config.yaml'}: {why}") and "\n" not in str(err.value)


def test_compile_on_a_cpu_without_a_compiler_is_one_line_before_anything_is_written(tiny_shards, tmp_path, monkeypatch):
    from torch._inductor import cpp_builder, exc

    def no_compiler() -> str:
        raise exc.InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    cfg = tiny_config(tiny_shards, tmp_path, "train.compile=true", "discriminator.kind=pathak")
    with pytest.raises(TrainingError, match=r"^train.compile=true: torch.compile on the CPU needs a C\+\+ compiler "
                                            r"and found none \(InvalidCxxCompiler\); .* set train.compile=false$"):
        TrainingSession(cfg, "train-pathak", cfg.train)
    assert not (tmp_path / "t" / "train-pathak").exists()
