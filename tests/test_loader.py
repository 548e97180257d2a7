"""The WebDataset loader: shapes, determinism, rank/worker split, batches_per_epoch, blur targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hybridgan.config import PackConfig, load_config
from hybridgan.data.loader import LoaderError, batches_per_epoch, make_loader
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


def test_batches_have_shape_dtype_and_range(shards):
    batches = _epoch(_cfg(shards), workers=0)
    assert len(batches) == 12 and all(len(b["key"]) == 4 for b in batches)
    image = batches[0]["image"]
    assert image.shape == (4, 3, SIZE, SIZE) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1 and image.std() > 0.1
    assert set(batches[0]) == {"image", "key"}


def test_same_seed_and_epoch_give_identical_batches(shards):
    cfg = _cfg(shards)
    first, second = _epoch(cfg, epoch=3), _epoch(cfg, epoch=3)
    assert _keys(first) == _keys(second)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, second))
    other_epoch = _epoch(cfg, epoch=4)
    assert _keys(other_epoch) != _keys(first)
    other_seed = _epoch(_cfg(shards, "run.seed=1"), epoch=3)
    assert _keys(other_seed) != _keys(first)


def test_augmentation_depends_on_key_not_on_worker(shards):
    cfg = _cfg(shards)
    one = {k: img for b in _epoch(cfg, workers=1, batch_size=2) for k, img in zip(b["key"], b["image"])}
    two = {k: img for b in _epoch(cfg, workers=2, batch_size=2) for k, img in zip(b["key"], b["image"])}
    assert one.keys() == two.keys() and len(one) == 48
    assert all(torch.equal(one[k], two[k]) for k in one)
    # workers=0 (in process) reads exactly what one worker reads.
    assert _keys(_epoch(cfg, workers=0)) == _keys(_epoch(cfg, workers=1))


def test_eval_split_is_unshuffled_unaugmented_and_complete(shards):
    cfg = _cfg(shards)
    a, b = _epoch(cfg, "val", epoch=0), _epoch(cfg, "val", epoch=7)
    assert _keys(a) == _keys(b) and len(_keys(a)) == 6
    assert [len(x["key"]) for x in a] == [4, 2]  # the partial batch is kept for evaluation
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


def test_two_ranks_two_workers_split_the_epoch(shards):
    cfg = _cfg(shards)
    ranks = [_keys(_epoch(cfg, rank=r, world_size=2, batch_size=2, epoch=1)) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    assert len(ranks[0]) + len(ranks[1]) == 48 and len(set(ranks[0]) | set(ranks[1])) == 48
    evals = [_keys(_epoch(cfg, "train", train=False, rank=r, world_size=2)) for r in range(2)]
    assert sorted(evals[0] + evals[1]) == sorted(ranks[0] + ranks[1])


def test_batches_per_epoch_is_what_every_rank_yields(shards):
    cfg = _cfg(shards)
    # rank 0: shards 0,2,4 -> worker 0 gets 10+8, worker 1 gets 10; rank 1: shards 1,3 -> 10, 10.
    counts = [len(_epoch(cfg, rank=r, world_size=2, batch_size=4)) for r in range(2)]
    assert counts == [4 + 2, 2 + 2]
    assert batches_per_epoch(cfg, "train", 4, 2) == 4
    assert batches_per_epoch(cfg, "train", 4, 1) == len(_epoch(cfg, batch_size=4)) == 12
    assert batches_per_epoch(cfg, "val", 4, 1) == 2
    assert all(len(b["key"]) == 4 for b in _epoch(cfg, rank=0, world_size=2, batch_size=4))


def test_rank_without_shards_is_a_clear_error(shards):
    with pytest.raises(LoaderError, match="shard_size or set data.resampled=true"):
        make_loader(_cfg(shards), "val", batch_size=2, rank=1, world_size=2)


def test_resampled_epochs_have_samples_per_epoch_per_rank(shards):
    cfg = _cfg(shards, "data.resampled=true", "data.samples_per_epoch=12")
    for rank in range(2):
        batches = _epoch(cfg, rank=rank, world_size=2, batch_size=3)
        assert len(_keys(batches)) == 12
    assert batches_per_epoch(cfg, "train", 3, 2) == 4
    assert _keys(_epoch(cfg, epoch=2)) == _keys(_epoch(cfg, epoch=2)) != _keys(_epoch(cfg, epoch=3))


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


def test_a_corrupt_jpeg_in_a_shard_names_shard_and_key(shards, tmp_path):
    import hashlib
    import shutil
    import tarfile

    import webdataset as wds

    copy = tmp_path / "syn"
    shutil.copytree(shards, copy)
    shard = copy / "val-000000.tar"
    with tarfile.open(shard) as tar:
        first_key = sorted(m.name for m in tar.getmembers())[0].split(".")[0]
    with wds.TarWriter(str(shard)) as writer:
        writer.write({"__key__": first_key, "jpg": b"\xff\xd8 not a jpeg", "json": b"{}"})
    # A shard that no longer matches its manifest is refused before reading (test_manifest.py):
    # record the new one, so that the loader itself meets the bad JPEG.
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["name"] == shard.name)
    entry.update(size=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoaderError) as err:
        _epoch(_cfg(copy, "data.workers=0"), "val")
    assert str(err.value).startswith(f"{shard}: sample {first_key}: not a readable JPEG")
