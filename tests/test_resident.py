"""data.resident: Pillow-exact crops on the device, the same batches as the worker loader, the same training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import SMOKE, tiny_args, tiny_config
from hybridgan.data.loader import LoaderError, SplitLoader, augmentation, train_loader
from hybridgan.data.preprocess import crop_side, face_pixels
from hybridgan.data.resident import PillowBilinear, ResidentLoader, check_device_memory
from hybridgan.train import train
from stage_runs import accelerate_2_ranks, failure, launches, read_records, run_stage

CROP = "data.crop_fraction=0.9375"  # random crops at 17 offsets per axis (the tiny config crops nothing)


def _frames(frame: int, count: int) -> np.ndarray:
    """`count` random uint8 frames [count, frame, frame, 3]; every other one a checkerboard of 4x4
    blocks of 0 and 255 with 10 % noise: flat areas at both ends of the range and sharp edges."""
    rng = np.random.default_rng(frame)
    frames = rng.integers(0, 256, (count, frame, frame, 3), dtype=np.uint8)
    checker = ((np.indices((frame, frame)) // 4).sum(0) % 2 * 255).astype(np.uint8)[..., None]
    frames[1::2] = np.where(rng.random((frame, frame, 3)) < 0.9, checker, frames[1::2])
    return frames


@pytest.mark.parametrize("frame, crop_fraction, size",
                         [(256, 0.9375, 128), (96, 0.8, 32), (40, 0.5, 32), (32, 1.0, 32)])
def test_device_crops_equal_pillow_for_every_offset_and_flip(frame, crop_fraction, size):
    """The paper's 256 -> 240 -> 128 (dyadic scale), 96 -> 77 -> 32 (scale 2.406..., 7 taps) and an
    upscale 40 -> 20 -> 32, and 32 -> 32 -> 32 (Pillow copies); every crop offset on both axes, with and
    without flip."""
    side = crop_side(frame, crop_fraction)
    offsets = frame - side + 1
    frames = _frames(frame, offsets)
    left, top = np.arange(offsets), np.arange(offsets)[::-1].copy()
    crops = PillowBilinear(frame, crop_fraction, size, "cpu")
    for flip in (False, True):
        got = crops(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(left),
                    torch.from_numpy(top), torch.full((offsets,), flip))
        assert got.dtype == torch.uint8 and got.shape == (offsets, 3, size, size)
        for i in range(offsets):
            box = (left[i], top[i], left[i] + side, top[i] + side)
            expected = face_pixels(Image.fromarray(frames[i]), size, box, flip)
            assert np.array_equal(got[i].permute(1, 2, 0).numpy(), expected), (i, flip)


@pytest.fixture(scope="module")
def resident(tiny_shards, tmp_path_factory):
    """The tiny pack's train split (64 frames of 256x256) held by one ResidentLoader per (world_size, rank)."""
    cfg = tiny_config(tiny_shards, tmp_path_factory.mktemp("runs"), CROP)
    loaders = {(world, rank): ResidentLoader(cfg, "train", batch_size=8, rank=rank, world_size=world,
                                             workers=2 if rank else 0)
               for world, rank in [(1, 0), (2, 0), (2, 1)]}
    return cfg, loaders


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 0), (2, 1)])
def test_resident_batches_equal_the_worker_loaders(resident, world_size, rank):
    cfg, loaders = resident
    loader = loaders[(world_size, rank)]
    workers = SplitLoader(cfg, "train", batch_size=8, rank=rank, world_size=world_size, workers=0)
    assert len(loader) == len(workers) == 8
    drawn = set()
    for epoch, start in [(0, 0), (1, 0), (1, 5)]:
        expected, got = list(workers(epoch, start)), list(loader(epoch, start))
        assert len(got) == len(expected) == 8 - start
        for a, b in zip(expected, got):
            assert b["key"] == a["key"] and len(b["key"]) == 8 // world_size
            assert b["image"].dtype == torch.uint8 and torch.equal(b["image"], a["image"])
            drawn |= {augmentation(loader.opts, epoch, key, 256)[:2] for key in b["key"]}
    assert {flip for _, flip in drawn} == {False, True} and len({box for box, _ in drawn}) > 10


def test_resident_frames_are_decoded_alike_by_any_worker_count(resident):
    _, loaders = resident
    assert loaders[(2, 0)].keys == loaders[(2, 1)].keys  # workers=0 and workers=2
    assert torch.equal(loaders[(2, 0)].frames, loaders[(2, 1)].frames)
    assert loaders[(1, 0)].frames.shape == (64, 3, 256, 256)


def test_training_with_resident_data_gives_the_same_losses(tiny_shards, tmp_path, capsys):
    """A short GAN run on the resident split logs exactly the losses and ends with exactly the
    generator of the same run on the worker loader."""
    def run(name: str, resident: bool) -> tuple[list[dict], dict]:
        cfg = tiny_config(tiny_shards, tmp_path, CROP, "discriminator.kind=pathak", "discriminator.from_scratch=true",
                          "train.max_steps=4", f"run.name={name}", f"data.resident={str(resident).lower()}")
        export = train(cfg)
        records = [json.loads(line) for line in (export.parent / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if r["split"] in ("train", "epoch")], load_file(str(export))

    workers_records, workers_weights = run("workers", False)
    resident_records, resident_weights = run("resident", True)
    assert "data.resident: the train split's 64 frames of 3x256x256 uint8 take 0.01 GB" in capsys.readouterr().out
    assert len(workers_records) >= 2 and resident_records == workers_records
    assert all(torch.equal(workers_weights[k], resident_weights[k]) for k in workers_weights)


def test_pretraining_keeps_the_worker_loader_and_says_so(tiny_shards, tmp_path, capsys):
    cfg = tiny_config(tiny_shards, tmp_path, "data.resident=true")
    assert isinstance(train_loader(cfg, "train", batch_size=8, with_blur=True), SplitLoader)
    assert "data.resident: pretraining reads its batches with the worker loader" in capsys.readouterr().out


def test_a_device_too_small_for_the_frames_is_refused_naming_the_sizes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (8 * 10**9, 80 * 10**9))
    what = "the train split's 28,000 frames of 3x256x256 uint8"
    with pytest.raises(LoaderError, match=r"take 5\.51 GB but cuda:0 has 8\.00 GB free of 80\.00 GB, and 25% of it"):
        check_device_memory(28_000 * 3 * 256 * 256, torch.device("cuda:0"), what)
    check_device_memory(28_000 * 3 * 256 * 256, torch.device("cpu"), what)  # host memory: not checked
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (70 * 10**9, 80 * 10**9))
    check_device_memory(28_000 * 3 * 256 * 256, torch.device("cuda:0"), what)


def test_a_corrupt_jpeg_stops_the_decoding_workers_naming_shard_and_key(tiny_shards, tmp_path):
    import hashlib
    import shutil

    import webdataset as wds

    copy = tmp_path / "pack"
    shutil.copytree(tiny_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["split"] == "train")
    shard = copy / entry["name"]
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    samples[3]["jpg"] = b"\xff\xd8 not a jpeg"
    with wds.TarWriter(str(shard)) as writer:
        for sample in samples:
            writer.write({k: v for k, v in sample.items() if k in ("__key__", "jpg", "json")})
    entry.update(size=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoaderError) as err:
        ResidentLoader(tiny_config(copy, tmp_path), "train", batch_size=8, workers=2)
    assert str(err.value).startswith(f"{shard}: sample {samples[3]['__key__']}: not a readable JPEG")


@pytest.mark.slow
def test_two_real_ranks_train_alike_on_resident_and_worker_batches(tiny_shards, tmp_path):
    """2-rank DDP on the CPU: each rank decodes the split with 2 workers and takes its half of every
    global batch; the losses and the generator equal those of the worker loader's 2-rank run, and
    only rank 0 prints the frames' size."""
    def run(name: str, resident: bool):
        args = tiny_args(tiny_shards, tmp_path, CROP, "discriminator.kind=pathak", "discriminator.from_scratch=true",
                         "train.max_steps=4", "data.workers=2", f"run.name={name}",
                         f"data.resident={str(resident).lower()}")
        result = run_stage("hybridgan.train", args, launcher=accelerate_2_ranks())
        assert result.returncode == 0, failure(result)
        stage = tmp_path / name / "train-pathak"
        assert [launch["world_size"] for launch in launches(stage)] == [2]
        return result, read_records(stage, "train"), load_file(str(stage / "generator.safetensors"))

    _, workers_records, workers_weights = run("workers", False)
    result, resident_records, resident_weights = run("resident", True)
    assert result.stdout.count("data.resident: the train split's 64 frames") == 1
    assert len(workers_records) >= 2 and resident_records == workers_records
    assert all(torch.equal(workers_weights[k], resident_weights[k]) for k in workers_weights)


def test_bench_loader_times_the_resident_batches_next_to_the_workers(tiny_shards, tmp_path, capsys):
    from hybridgan.bench import main as bench

    out = tmp_path / "loader.json"
    assert bench(["loader", "--shards", str(tiny_shards), "--workers", "0", "--batches", "3", "--batch-size", "8",
                  "--pack-images", "0", "--resident", "--json", str(out), "--config", str(SMOKE), "data.image_size=32",
                  "mask.hole_size=16", CROP]) == 0
    result = json.loads(out.read_text())
    [workers_row], [resident_row] = result["loader"], result["resident"]
    assert workers_row["images"] == resident_row["images"] == 24
    assert resident_row["device"] == "cpu" and resident_row["images_per_s"] > 0
    assert "resident train split (data.resident): batches made on cpu" in capsys.readouterr().out
