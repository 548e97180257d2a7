"""Shards checked against the manifest: sizes and sha256 before a stage reads, and `pack --verify`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hybridgan.config import PackConfig
from hybridgan.data import manifest as manifest_module
from hybridgan.data.manifest import ManifestError, shard_entries, shard_urls, verify_shards
from hybridgan.pack import main, pack


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "pack"
    pack("synthetic:30", out, PackConfig(shard_size=10, val_fraction=0.2, test_fraction=0.2), workers=1)
    return out


@pytest.fixture
def copy(packed, tmp_path) -> Path:
    """A fresh copy of the pack, for tests that damage it (hashes memoised by path are not reused)."""
    return Path(shutil.copytree(packed, tmp_path / "copy"))


def _edit_manifest(folder: Path, name: str, **changes) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    next(s for s in data["shards"] if s["name"] == name).update(changes)
    path.write_text(json.dumps(data))


def test_intact_pack_passes_and_is_hashed_once_per_process(packed, monkeypatch):
    assert [e["name"] for e in shard_entries(packed, "train")] == ["train-000000.tar", "train-000001.tar"]
    hashed = []
    real = manifest_module.hashlib.file_digest
    monkeypatch.setattr(manifest_module.hashlib, "file_digest", lambda *a: hashed.append(a) or real(*a))
    for _ in range(3):  # the loader asks every epoch
        shard_urls(packed, "train")
    assert hashed == []
    assert verify_shards(packed)[:2] == ([], 4)


def test_wrong_sha256_names_the_shard(copy):
    _edit_manifest(copy, "train-000001.tar", sha256="0" * 64)
    with pytest.raises(ManifestError) as err:
        shard_entries(copy, "train")
    message = str(err.value)
    assert message.startswith(f"{copy / 'train-000001.tar'}: sha256 ") and "the manifest says 0000" in message
    assert len(message.splitlines()) == 1
    assert shard_entries(copy, "val")  # other splits are still readable


def test_truncated_shard_is_refused_before_reading(copy):
    shard = copy / "train-000000.tar"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    with pytest.raises(ManifestError, match=rf"train-000000.tar: {size // 2} bytes, the manifest says {size} "
                                            r"\(truncated or replaced\)"):
        shard_urls(copy, "train")


def test_changed_shard_of_the_same_size_is_caught_by_its_hash(copy):
    shard = copy / "test-000000.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="test-000000.tar: sha256"):
        shard_entries(copy, "test")


def test_verify_cli_names_every_mismatch(copy, packed, capsys):
    assert main(["--verify", str(packed)]) == 0
    assert "all 4 shards match" in capsys.readouterr().out
    _edit_manifest(copy, "val-000000.tar", sha256="f" * 64)
    (copy / "train-000001.tar").write_bytes(b"short")
    assert main(["--verify", str(copy)]) == 1
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2
    assert errors[0].startswith(f"verify error: {copy / 'train-000001.tar'}: 5 bytes, the manifest says")
    assert errors[1].startswith(f"verify error: {copy / 'val-000000.tar'}: sha256 ")
    assert "2 of 4 shards do not match" in captured.out
    assert main(["--verify", str(copy / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_training_refuses_a_truncated_shard_before_its_first_step(tiny_shards, tmp_path, capsys):
    from conftest import tiny_args
    from hybridgan.train import main as train_main

    shards = Path(shutil.copytree(tiny_shards, tmp_path / "shards"))
    shard = shards / "train-000003.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(SystemExit) as stopped:
        train_main(tiny_args(shards, tmp_path / "runs", "discriminator.from_scratch=true"))
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {shard}: 1000 bytes, the manifest says")
    stage = tmp_path / "runs" / "t" / "train-hybrid"
    assert stage.is_dir() and not (stage / "metrics.jsonl").exists() and not (stage / "checkpoints").exists()
