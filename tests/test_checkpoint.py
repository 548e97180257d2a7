"""Checkpoints: manifests, fallback to the newest intact checkpoint, damaged ones kept aside, umask,
the background writer (consistent snapshot, failures, the same files as a synchronous save)."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest
import torch
from accelerate import Accelerator

from hybridgan import checkpoint
from hybridgan.checkpoint import CheckpointError, CheckpointManager, verify_manifest
from hybridgan.config import load_config
from hybridgan.exports import save_export


@pytest.fixture
def saved(tmp_path):
    """A stage folder with checkpoints of steps 3 and 6 of a tiny model (weight = step), and the
    manager with its model."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters()))
    manager = CheckpointManager(accelerator, tmp_path, keep=3)
    for step in (3, 6):
        with torch.no_grad():
            model.weight.fill_(step)
        manager.save(step, {"world_size": 1, "batch_size_per_rank": 8})
    manager.wait()
    return manager, model


def _resume(manager: CheckpointManager, model: torch.nn.Module) -> tuple[str, list[str], float]:
    """Resume point name, lines said, and the weight value after loading it."""
    said: list[str] = []
    path = manager.find_resume_point(said.append)
    manager.load(path)
    return path.name, said, model.weight[0, 0].item()


def test_manifest_lists_every_file_with_size_and_hash_and_what_it_was_saved_with(saved):
    manager, _ = saved
    checkpoint = manager.dir / "step-00000006"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    names = {entry["name"] for entry in manifest["files"]}
    assert "model.safetensors" in names and "optimizer.bin" in names
    assert all(entry["size"] == (checkpoint / entry["name"]).stat().st_size for entry in manifest["files"])
    assert manager.saved_with(checkpoint) == {"world_size": 1, "batch_size_per_rank": 8}
    assert verify_manifest(checkpoint) is None
    assert (manager.dir / "latest").read_text() == "step-00000006"


def test_intact_latest_is_used_silently(saved):
    assert _resume(*saved) == ("step-00000006", [], 6.0)


def test_missing_pointer_resumes_from_the_newest_checkpoint_and_rewrites_it(saved):
    manager, model = saved
    (manager.dir / "latest").unlink()
    name, said, weight = _resume(manager, model)
    assert (name, weight) == ("step-00000006", 6.0)
    assert len(said) == 1 and "latest: missing" in said[0]
    assert (manager.dir / "latest").read_text() == "step-00000006"


def test_dangling_pointer_resumes_from_the_newest_checkpoint(saved):
    manager, model = saved
    (manager.dir / "latest").write_text("step-00000099")
    name, said, weight = _resume(manager, model)
    assert (name, weight) == ("step-00000006", 6.0) and "step-00000099" in said[0]


def test_truncated_weights_are_moved_aside_and_the_previous_checkpoint_is_used(saved):
    manager, model = saved
    weights = manager.dir / "step-00000006" / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    name, said, weight = _resume(manager, model)
    assert (name, weight) == ("step-00000003", 3.0)
    damaged = manager.dir / "damaged-step-00000006"
    assert damaged.is_dir() and (damaged / "model.safetensors").stat().st_size == size // 2
    assert any("step-00000006: damaged (model.safetensors has" in line and "damaged-step-00000006" in line
               for line in said)
    assert (manager.dir / "latest").read_text() == "step-00000003"


def test_same_size_corruption_is_caught_by_the_hash(saved):
    manager, model = saved
    weights = manager.dir / "step-00000006" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    name, said, _ = _resume(manager, model)
    assert name == "step-00000003" and "does not match its sha256" in said[-1]


def test_all_checkpoints_damaged_is_one_clear_error_and_nothing_is_deleted(saved):
    manager, _ = saved
    for step in (3, 6):
        os.truncate(manager.dir / f"step-{step:08d}" / "model.safetensors", 10)
    with pytest.raises(CheckpointError) as err:
        manager.find_resume_point(lambda line: None)
    message = str(err.value)
    assert "\n" not in message and "no intact checkpoint" in message
    assert "damaged-step-00000003" in message and "damaged-step-00000006" in message
    assert sorted(p.name for p in manager.dir.glob("damaged-*")) == ["damaged-step-00000003", "damaged-step-00000006"]


def test_checkpoints_and_exports_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(4, 2)
        model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters()))
        manager = CheckpointManager(accelerator, tmp_path, keep=1)
        checkpoint = manager.save(1, {})
        manager.wait()
        export = save_export(model.state_dict(), tmp_path / "generator.safetensors", load_config(), "generator")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*checkpoint.iterdir(), export]}
    assert modes["model.safetensors"] == 0o640 and modes["generator.safetensors"] == 0o640
    assert set(modes.values()) == {0o640}
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o750


def test_save_returns_while_the_writer_runs_and_the_checkpoint_holds_the_state_of_the_save(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters()))
    manager = CheckpointManager(accelerator, tmp_path, keep=3)
    release = threading.Event()
    honest = checkpoint.write_snapshot

    def held_writer(snapshot, folder):
        release.wait(timeout=30)
        honest(snapshot, folder)

    monkeypatch.setattr(checkpoint, "write_snapshot", held_writer)
    with torch.no_grad():
        model.weight.fill_(1.0)
    path = manager.save(1, {})
    assert not path.exists() and not (manager.dir / "latest").exists()  # the writer has not written yet
    with torch.no_grad():
        model.weight.fill_(99.0)  # the next steps change the model while the writer waits
    release.set()
    manager.wait()
    assert (manager.dir / "latest").read_text() == "step-00000001" and verify_manifest(path) is None
    assert _resume(manager, model) == ("step-00000001", [], 1.0)


def test_a_failed_background_write_is_one_line_at_the_next_save_and_the_previous_checkpoint_stays_latest(
        saved, monkeypatch):
    manager, model = saved

    def failing_writer(snapshot, folder):
        (folder / "model.safetensors").write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_snapshot", failing_writer)
    manager.save(9, {})
    monkeypatch.undo()
    with pytest.raises(CheckpointError) as err:
        manager.save(12, {})  # the next save waits for the failed one, and says so before writing
    message = str(err.value)
    assert "\n" not in message and ".partial-step-00000009: writing the checkpoint failed" in message
    assert "No space left on device" in message and "previous checkpoint stays the latest" in message
    assert (manager.dir / "latest").read_text() == "step-00000006"
    assert _resume(manager, model) == ("step-00000006", [], 6.0)
    manager.save(12, {})
    manager.wait()
    assert [p.name for p in manager.dir.iterdir() if p.name.startswith(".partial")] == []
    assert (manager.dir / "latest").read_text() == "step-00000012"


def test_background_and_synchronous_saves_write_the_same_files(tmp_path):
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters()))
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    manifests = []
    for background in (True, False):
        manager = CheckpointManager(accelerator, tmp_path / str(background), keep=1, background=background)
        path = manager.save(1, {})
        manager.wait()
        manifests.append(json.loads((path / "manifest.json").read_text())["files"])
    assert manifests[0] == manifests[1]
    assert {entry["name"] for entry in manifests[0]} == {"model.safetensors", "optimizer.bin", "random_states_0.pkl"}


def test_a_checkpoint_without_its_manifest_is_damaged_and_moved_aside(saved):
    manager, model = saved
    newest = manager.dir / "step-00000006"
    (newest / "manifest.json").unlink()
    from safetensors.torch import load_file, save_file
    weights = load_file(str(newest / "model.safetensors"))
    save_file({k: torch.full_like(v, 1e30) for k, v in weights.items()}, str(newest / "model.safetensors"))
    name, said, weight = _resume(manager, model)
    assert (name, weight) == ("step-00000003", 3.0)
    assert said == [f"{newest}: damaged (manifest.json is missing); moved to damaged-step-00000006"]
    assert (manager.dir / "damaged-step-00000006" / "model.safetensors").is_file()


def test_every_checkpoint_damaged_stays_an_error_on_every_rerun_until_the_named_key(saved):
    manager, _ = saved
    for step in (3, 6):
        os.truncate(manager.dir / f"step-{step:08d}" / "model.safetensors", 10)
    for _ in range(2):  # the second run finds no step-* at all, only the damaged ones moved aside
        with pytest.raises(CheckpointError) as err:
            manager.find_resume_point(lambda line: None)
        assert str(err.value) == (f"{manager.dir}: no intact checkpoint left (damaged-step-00000003, "
                                  f"damaged-step-00000006 are damaged and kept); restore one, or pass "
                                  f"run.restart_damaged=true to start the stage again from step 0")
    said: list[str] = []
    assert manager.find_resume_point(said.append, restart_damaged=True) is None
    assert said == [f"{manager.dir}: no intact checkpoint (damaged-step-00000003, damaged-step-00000006 are "
                    f"damaged and kept); run.restart_damaged=true: starting the stage again from step 0"]
    assert sorted(p.name for p in manager.dir.glob("damaged-*")) == ["damaged-step-00000003", "damaged-step-00000006"]


def test_a_checkpoint_damaged_twice_under_one_name_keeps_both(saved):
    manager, model = saved
    os.truncate(manager.dir / "step-00000006" / "model.safetensors", 10)
    manager.find_resume_point(lambda line: None)
    manager.save(6, {"world_size": 1, "batch_size_per_rank": 8})
    manager.wait()
    os.truncate(manager.dir / "step-00000006" / "optimizer.bin", 10)
    said: list[str] = []
    assert manager.find_resume_point(said.append).name == "step-00000003"
    assert said[-1].endswith("moved to damaged-step-00000006-2")
    assert (manager.dir / "damaged-step-00000006" / "model.safetensors").stat().st_size == 10
