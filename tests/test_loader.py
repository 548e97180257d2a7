"""The loader: exact epochs on any world size and worker count, uint8 batches, one pixel path, errors."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hybridgan.config import PackConfig, load_config

from hybridgan.data import loader as loader_module
from hybridgan.data import samples as samples_module
from hybridgan.data.blur import blur_square
from hybridgan.data.loader import (BatchPlan, LoaderError, SplitLayout, SplitLoader, batches_per_epoch, epoch_sequence,
                                  make_loader, to_device)
from hybridgan.data.preprocess import crop_box, eval_face, face_pixels
from hybridgan.pack import pack

SIZE = 32
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """synthetic:60 in shards of 10: train 10,10,10,10,8 (48), val 6, test 6."""
    out = tmp_path_factory.mktemp("loader") / "syn"
    pack("synthetic:60", out, PackConfig(shard_size=10, val_fraction=0.1, test_fraction=0.1), workers=1)
    return out


def _cfg(shards: Path, *overrides: str):
    return load_config(None, [f"data.shards={shards}", f"data.image_size={SIZE}", "mask.hole_size=16",
                              "data.shuffle_buffer=20", "data.workers=2", *overrides])


def _epoch(cfg, split="train", **kw) -> list[dict]:
    return list(make_loader(cfg, split, **{"batch_size": 4, **kw}))


def _keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_batches_are_uint8_and_to_device_normalises(shards):
    batches = _epoch(_cfg(shards), workers=0)
    assert len(batches) == 12 and all(len(b["key"]) == 4 for b in batches)
    image = batches[0]["image"]
    assert image.shape == (4, 3, SIZE, SIZE) and image.dtype == torch.uint8 and image.is_contiguous()
    assert set(batches[0]) == {"image", "key"}
    moved = to_device(batches[0], "cpu")
    assert moved["image"].dtype == torch.float32 and moved["key"] == batches[0]["key"]
    assert torch.equal(moved["image"], image.float() * (1 / 127.5) - 1)
    assert torch.equal(to_device(moved, "cpu")["image"], moved["image"])  # idempotent


def test_same_seed_and_epoch_give_identical_batches(shards):
    cfg = _cfg(shards)
    first, second = _epoch(cfg, epoch=3), _epoch(cfg, epoch=3)
    assert _keys(first) == _keys(second)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, second))
    other_epoch = _epoch(cfg, epoch=4)
    assert _keys(other_epoch) != _keys(first)
    other_seed = _epoch(_cfg(shards, "run.seed=1"), epoch=3)
    assert _keys(other_seed) != _keys(first)


def test_one_loader_serves_every_epoch_and_starts_at_any_batch(shards):
    cfg = _cfg(shards)
    loader = SplitLoader(cfg, "train", batch_size=4, workers=2)
    assert len(loader) == 12
    for epoch in (0, 1, 0):
        assert _keys(list(loader(epoch))) == _keys(_epoch(cfg, epoch=epoch, workers=0))
    assert _keys(list(loader(1, start=5))) == _keys(_epoch(cfg, epoch=1, workers=0))[5 * 4:]


def test_eval_split_is_unshuffled_unaugmented_and_complete(shards):
    cfg = _cfg(shards)
    a, b = _epoch(cfg, "val", epoch=0), _epoch(cfg, "val", epoch=7)
    assert _keys(a) == _keys(b) and len(_keys(a)) == 6
    assert [len(x["key"]) for x in a] == [4, 2]  # the partial batch is kept for evaluation
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert batches_per_epoch(cfg, "val", 4) == 2


def _all_ranks(cfg, world: int, workers: int, batch: int, epoch: int = 1) -> list[list[dict]]:
    """Every rank's epoch, built in this process."""
    return [_epoch(cfg, rank=r, world_size=world, workers=workers, batch_size=batch, epoch=epoch)
            for r in range(world)]


def test_global_step_sees_the_same_images_on_any_world_size_and_worker_count(shards):
    cfg = _cfg(shards)
    one = _epoch(cfg, workers=0, batch_size=4, epoch=1)
    assert len(one) == batches_per_epoch(cfg, "train", 4) == 48 // 4
    for world, workers in ((2, 0), (2, 2), (4, 3)):
        ranks = _all_ranks(cfg, world, workers, batch=4)
        assert all(len(r) == len(one) for r in ranks)
        for step, batch in enumerate(one):
            parts = [ranks[r][step] for r in range(world)]
            assert [k for p in parts for k in p["key"]] == batch["key"]
            assert torch.equal(torch.cat([p["image"] for p in parts]), batch["image"])  # same pixels
    with pytest.raises(LoaderError, match="batch size 4 is not a positive multiple of the world size 3"):
        SplitLoader(cfg, "train", batch_size=4, world_size=3)


def test_every_training_image_once_per_epoch_for_1_to_64_ranks_and_0_to_8_workers(mix=1000, resampled=False):
    """The paper's layout (28 shards x 1,000) from a manifest alone: positions of all ranks' batches."""
    layout = SplitLayout(tuple(f"train-{i:06d}.tar" for i in range(28)), (1000,) * 28)
    for epoch in (1,):
        sequence = epoch_sequence(layout, seed=7, epoch=epoch, train=True, mix=mix, resampled=resampled)
        assert len(sequence) == 28000 and (resampled or len(set(sequence.tolist())) == 28000)
        for world in range(1, 65):
            batch = world * max(1, 16 // world)
            for workers in range(0, 9):
                seen = []
                for rank in range(world):
                    plan = BatchPlan(len(sequence), batch, rank, world, train=True)
                    assert plan.batches == 28000 // batch
                    for worker in range(max(1, workers)):
                        seen += plan.positions(plan.worker_batches(worker, max(1, workers)))
                counts = np.bincount(np.concatenate(seen), minlength=28000)
                steps = 28000 // batch
                assert counts.max() == 1 and counts.sum() == steps * batch > 28000 - batch
                keys = np.bincount(sequence[counts == 1], minlength=28000)
                assert resampled or keys.max() == 1


def test_blur_target_follows_square_crop_and_flip(shards):
    # Side fixed to 64 at (80, 80) in the 256 frame: rows/cols 10..18 at 32x32. No crop, so only flips.
    cfg = _cfg(shards, "blur.min_side=64", "blur.max_side=64", "data.crop_fraction=1.0")
    train = _epoch(cfg, with_blur=True, batch_size=8)
    plain = {k: img for b in _epoch(cfg, "train", train=False, with_blur=True, batch_size=8)
             for k, img in zip(b["key"], b["image"])}
    flips = changed = 0
    for batch in train:
        assert batch["blur_target"].shape == (8, 1, SIZE, SIZE) and batch["blurred"].shape == (8, 3, SIZE, SIZE)
        for key, image, blurred, target in zip(batch["key"], batch["image"], batch["blurred"],
                                               batch["blur_target"]):
            flipped = torch.equal(image, plain[key].flip(-1))
            assert flipped or torch.equal(image, plain[key])
            flips += flipped
            cols = slice(14, 22) if flipped else slice(10, 18)
            expected = torch.ones(SIZE, SIZE)
            expected[10:18, cols] = 0
            assert torch.equal(target[0], expected)
            # At 32x32 the 256-frame blur is mostly averaged away, but it still shows inside.
            changed += bool((blurred - image)[:, 10:18, cols].abs().max() > 0)
            far = torch.ones(SIZE, SIZE, dtype=torch.bool)
            far[9:19, cols.start - 1:cols.stop + 1] = False  # resampling touches one pixel around
            assert torch.equal(blurred[:, far], image[:, far])
    assert 0 < flips < 48 and changed >= 40


def test_bench_loader_reports_figures(shards, tmp_path, capsys):
    from hybridgan.bench import main

    out = tmp_path / "bench.json"
    assert main(["loader", "--shards", str(shards), "--workers", "0,1", "--batches", "3",
                 "--pack-images", "12", "--json", str(out), "--config", str(REPO / "configs/smoke-cpu.yaml"),
                 f"data.image_size={SIZE}", "mask.hole_size=16"]) == 0
    figures = json.loads(out.read_text())
    assert [row["workers"] for row in figures["loader"]] == [0, 1]
    assert all(row["images"] == 3 * 16 and row["images_per_s"] > 0 for row in figures["loader"])
    assert figures["pack"][0]["images"] == 12 and figures["pack"][0]["images_per_s"] > 0
    assert "train loader" in capsys.readouterr().out


def _record_in_manifest(pack: Path, shard: Path) -> None:
    """Make the manifest agree with a shard changed by a test, so that the manifest check
    (test_manifest.py) lets it through and the loader itself meets the damage mid-read."""
    manifest = json.loads((pack / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["name"] == shard.name)
    entry.update(size=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
    (pack / "manifest.json").write_text(json.dumps(manifest))


def test_a_corrupt_jpeg_in_a_shard_names_shard_and_key(shards, tmp_path):
    import shutil

    import webdataset as wds

    copy = tmp_path / "syn"
    shutil.copytree(shards, copy)
    shard = copy / "val-000000.tar"
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    first_key = samples[0]["__key__"]
    samples[0]["jpg"] = b"\xff\xd8 not a jpeg"
    with wds.TarWriter(str(shard)) as writer:
        for sample in samples:
            writer.write({k: v for k, v in sample.items() if k in ("__key__", "jpg", "json")})
    _record_in_manifest(copy, shard)
    with pytest.raises(LoaderError) as err:
        _epoch(_cfg(copy, "data.workers=0"), "val")
    assert str(err.value).startswith(f"{shard}: sample {first_key}: not a readable JPEG")


def test_a_truncated_shard_is_one_line_naming_it(shards, tmp_path):
    import shutil

    copy = tmp_path / "syn"
    shutil.copytree(shards, copy)
    shard = copy / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    _record_in_manifest(copy, shard)
    for workers in (0, 1):
        with pytest.raises(LoaderError) as err:
            _epoch(_cfg(copy), "val", workers=workers)
        assert f"{shard}: cannot read the shard" in str(err.value) or f"{shard}: the shard holds" in str(err.value)


def test_training_and_evaluation_share_the_pixel_path(shards, monkeypatch):
    """A face through the training path with the crop forced to the centre and no flip gives the
    evaluation view's pixels, which are preprocess.eval_face of the stored frame; the blur path too."""
    cfg = _cfg(shards, "data.hflip=false")
    monkeypatch.setattr(samples_module, "crop_box", lambda frame, fraction, rng=None: crop_box(frame, fraction))
    train = {k: (img, blurred) for b in _epoch(cfg, with_blur=True, workers=0)
             for k, img, blurred in zip(b["key"], b["image"], b["blurred"])}
    evals = {k: img for b in _epoch(cfg, "train", train=False, workers=0) for k, img in zip(b["key"], b["image"])}
    assert train.keys() == evals.keys() and len(train) == 48
    assert all(torch.equal(train[k][0], evals[k]) for k in train)
    layout = SplitLayout.read(cfg, "train")
    frames = dict(loader_module.read_shard(layout.paths[0], layout.counts[0]))
    box = crop_box(256, cfg.data.crop_fraction)
    assert box == (8, 8, 248, 248)
    for key, jpeg in list(frames.items())[:3]:
        frame = Image.open(io.BytesIO(jpeg))
        expected = torch.from_numpy(eval_face(frame, SIZE, cfg.data.crop_fraction)).permute(2, 0, 1)
        assert torch.equal(evals[key], expected)
        rng = np.random.default_rng(loader_module.stable_seed(cfg.run.seed, 0, key))
        blurred, _ = blur_square(np.asarray(frame.convert("RGB")), rng, cfg.blur)
        expected = torch.from_numpy(face_pixels(Image.fromarray(blurred), SIZE, box)).permute(2, 0, 1)
        assert torch.equal(train[key][1], expected)


@pytest.mark.slow
def test_two_real_ranks_see_every_training_key_once_per_epoch(shards, tmp_path):
    from stage_runs import REPO as ROOT
    from stage_runs import accelerate_2_ranks, failure, stage_env

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    cfg = _cfg(shards)
    command = [*accelerate_2_ranks(), str(probe), str(shards), str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=stage_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, failure(done)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in reports] == [2, 2]
    keys = reports[0]["keys"] + reports[1]["keys"]
    assert len(keys) == len(set(keys)) == 48 == batches_per_epoch(cfg, "train", 4) * 4
    steps = list(zip(*(r["steps"] for r in reports)))
    assert [a + b for a, b in steps] == [b["key"] for b in _epoch(cfg, workers=0, batch_size=4, epoch=0)]


PROBE = """
import json, sys
from accelerate import Accelerator
from hybridgan.config import load_config
from hybridgan.data.loader import SplitLoader
from hybridgan.distributed import end_process_group

acc = Accelerator(cpu=True)
cfg = load_config(None, [f"data.shards={sys.argv[1]}", "data.image_size=32", "mask.hole_size=16",
                         "data.shuffle_buffer=20", "data.workers=1"])
loader = SplitLoader(cfg, "train", batch_size=4, rank=acc.process_index, world_size=acc.num_processes)
steps = [batch["key"] for batch in loader(0)]
out = {"world_size": acc.num_processes, "steps": steps, "keys": [k for s in steps for k in s]}
open(f"{sys.argv[2]}/rank{acc.process_index}.json", "w").write(json.dumps(out))
end_process_group()
"""


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_a_worker_checkpoints_the_current_step(tiny_shards, tmp_path):
    """Workers ignore the stop signals; the main process saves the step it is at and exits 75;
    its workers do not outlive it."""
    import os
    import signal

    import psutil
    from conftest import tiny_args
    from stage_runs import latest_step, start_stage, wait_for

    args = tiny_args(tiny_shards, tmp_path, "data.workers=1", "pretrain.epochs=50",
                     "pretrain.checkpoint_every=4", "pretrain.log_every=1")
    stage = tmp_path / "t" / "pretrain"
    proc = start_stage("hybridgan.pretrain", args)
    try:
        wait_for(lambda: latest_step(stage) >= 4 or proc.poll() is not None, 240, "a first checkpoint")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "no loader worker runs"
        wait_for(lambda: latest_step(stage) != 4 or len((stage / "metrics.jsonl").read_text().splitlines()) > 5,
                 60, "a step past the first checkpoint")
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, output
    assert "Traceback" not in output and "killed by signal" not in output, output
    assert latest_step(stage) > 4
    wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children), 10,
             "the workers to end")


def test_resampled_epochs_hold_samples_per_epoch_in_all(shards):
    cfg = _cfg(shards, "data.resampled=true", "data.samples_per_epoch=24")
    assert batches_per_epoch(cfg, "train", 4) == 6
    ranks = _all_ranks(cfg, 2, 0, batch=4, epoch=2)
    assert [len(_keys(r)) for r in ranks] == [12, 12]
    assert _keys(_epoch(cfg, epoch=2, workers=0)) == [k for a, b in zip(*ranks) for k in a["key"] + b["key"]]
    assert _keys(_epoch(cfg, epoch=2)) != _keys(_epoch(cfg, epoch=3))
