"""`hybridgan.pack`: shards, manifest, splits, restart after a kill, and clear errors."""

from __future__ import annotations

import hashlib
import io
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from hybridgan.config import PackConfig
from hybridgan.data.manifest import ManifestError, read_manifest, shard_urls
from hybridgan.data.synthetic import synthetic_face
from hybridgan.pack import PackError, Source, main, make_plan, pack, sample_key, split_sizes
from test_photo import rotated_jpeg, upright_red_over_blue

REPO = Path(__file__).resolve().parents[1]
CFG = PackConfig(shard_size=4, val_fraction=0.2, test_fraction=0.1, workers=1)

# (relative path, size, format): nested folders, JPEG and PNG in any case, non-square, non-256.
FILES = [
    ("a/one.jpg", (256, 256), "JPEG"), ("a/two.JPG", (300, 200), "JPEG"),
    ("a/b/three.png", (128, 128), "PNG"), ("a/b/four.jpeg", (512, 512), "JPEG"),
    ("five.PNG", (200, 320), "PNG"), ("c/six.jpg", (256, 256), "JPEG"),
    ("c/seven.png", (64, 64), "PNG"), ("c/d/e/eight.jpg", (1024, 768), "JPEG"),
    ("nine.jpg", (256, 256), "JPEG"), ("ten.jpeg", (257, 255), "JPEG"),
]


def _write_images(root: Path, files=FILES, order=1) -> None:
    for i, (rel, size, fmt) in list(enumerate(files))[::order]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        synthetic_face(i).resize(size).save(path, format=fmt)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    _write_images(root)
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def folder_pack(image_folder, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("packs") / "folder"
    return out, pack(str(image_folder), out, CFG)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_samples(out: Path) -> dict[str, dict]:
    """Every sample of every shard, read with plain webdataset (no project code)."""
    urls = sorted(str(p) for p in out.glob("*.tar"))
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil")
    return {s["__key__"]: s for s in dataset}


def test_folder_pack_writes_readable_shards_and_manifest(folder_pack, image_folder):
    out, manifest = folder_pack
    assert manifest == read_manifest(out) and manifest["version"] == "0.1.0"
    assert manifest["counts"] == {"train": 7, "val": 2, "test": 1} and manifest["skipped"] == 0
    assert manifest["not_images"] == ["notes.txt"] and manifest["skipped_files"] == []
    assert manifest["image_size"] == 256 and manifest["source"] == str(image_folder.resolve())
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == ["test-000000.tar", "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    for shard in manifest["shards"]:
        assert shard["sha256"] == _sha(out / shard["name"])
        assert shard["size"] == (out / shard["name"]).stat().st_size
    assert [s["count"] for s in manifest["shards"] if s["split"] == "train"] == [4, 3]
    listing = subprocess.run(["tar", "-tf", str(out / "train-000000.tar")], capture_output=True,
                             text=True, check=True).stdout.split()
    assert len(listing) == 8 and all(n.endswith((".jpg", ".json")) for n in listing)
    samples = _read_samples(out)
    assert set(samples) == {sample_key(rel) for rel, _, _ in FILES}
    for rel, size, _ in FILES:
        sample = samples[sample_key(rel)]
        assert sample["jpg"].size == (256, 256) and sample["jpg"].mode == "RGB"
        assert sample["json"]["source"] == rel and tuple(sample["json"]["original_size"]) == size
    splits = {s["json"]["split"] for s in samples.values()}
    assert splits == {"train", "val", "test"}
    assert read_manifest(out)["counts"]["val"] == 2 and len(shard_urls(out, "train")) == 2


def test_256_jpeg_is_stored_byte_for_byte_and_others_centre_cropped(folder_pack, image_folder):
    out, _ = folder_pack
    samples = {s["__key__"]: s for s in wds.WebDataset(shard_urls(out, "train") + shard_urls(out, "val")
                                                        + shard_urls(out, "test"), shardshuffle=False)}
    assert samples["nine_jpg"]["jpg"] == (image_folder / "nine.jpg").read_bytes()
    # A 200x320 portrait keeps its centre rows: compare with an explicit centre crop.
    source = Image.open(image_folder / "five.PNG").convert("RGB").crop((0, 60, 200, 260)).resize((256, 256))
    packed = Image.open(io.BytesIO(samples["five_PNG"]["jpg"])).convert("RGB")
    diff = sum(abs(a - b) for a, b in zip(source.tobytes(), packed.tobytes())) / (256 * 256 * 3)
    assert diff < 6


def test_zip_pack_equals_folder_pack(folder_pack, image_folder, tmp_path):
    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for rel, _, _ in reversed(FILES):  # a different order than the folder walk
            zf.write(image_folder / rel, rel)
    manifest = pack(str(archive), tmp_path / "zip", CFG)
    out, folder_manifest = folder_pack
    assert manifest["counts"] == folder_manifest["counts"]
    # Same keys in the same shards, same bytes: only the source differs.
    assert [(s["name"], s["count"]) for s in manifest["shards"]] == \
        [(s["name"], s["count"]) for s in folder_manifest["shards"]]
    zip_samples, folder_samples = _read_samples(tmp_path / "zip"), _read_samples(out)
    assert {k: s["json"]["split"] for k, s in zip_samples.items()} == \
        {k: s["json"]["split"] for k, s in folder_samples.items()}


def test_synthetic_pack_counts_and_checksums(tmp_path):
    cfg = PackConfig(shard_size=10, val_fraction=0.1, test_fraction=0.1)
    manifest = pack("synthetic:60", tmp_path / "syn", cfg, workers=2)
    assert manifest["counts"] == {"train": 48, "val": 6, "test": 6} and manifest["total"] == 60
    assert [s["count"] for s in manifest["shards"]] == [10, 10, 10, 10, 8, 6, 6]
    for shard in manifest["shards"]:
        assert shard["sha256"] == _sha(tmp_path / "syn" / shard["name"])
    samples = _read_samples(tmp_path / "syn")
    assert len(samples) == 60 and all(s["jpg"].size == (256, 256) for s in samples.values())
    # Deterministic: the same source packs to byte-identical shards.
    again = pack("synthetic:60", tmp_path / "again", cfg, workers=1)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_split_sizes_match_celeba_hq():
    assert split_sizes(30000, PackConfig()) == {"train": 28000, "val": 1000, "test": 1000}
    paper = PackConfig(val_fraction=0.0333333333333, test_fraction=0.0333333333333)
    assert split_sizes(30000, paper) == {"train": 28000, "val": 1000, "test": 1000}
    assert split_sizes(600, PackConfig(val_fraction=0.1, test_fraction=0.1)) == \
        {"train": 480, "val": 60, "test": 60}


def _splits(plan: dict) -> dict[str, str]:
    return {k: s["split"] for s in plan["shards"] for k in s["keys"]}


def test_split_is_stable_under_reordering_and_additions():
    cfg = PackConfig(shard_size=50, val_fraction=0.1, test_fraction=0.1)
    refs = [f"dir{i % 7}/img{i}.jpg" for i in range(1000)]
    base = _splits(make_plan(Source("folder", "/x", tuple(refs)), cfg))
    reordered = _splits(make_plan(Source("folder", "/x", tuple(reversed(refs))), cfg))
    assert reordered == base
    grown = _splits(make_plan(Source("folder", "/x", tuple(refs + [f"new/{i}.jpg" for i in range(10)])), cfg))
    moved = [k for k in base if grown[k] != base[k]]
    assert len(moved) <= 10  # only keys at a split boundary may move


def _pack_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hybridgan.pack", *args, "--config",
                             "configs/smoke-cpu.yaml"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_killed_pack_resumes_without_rewriting_finished_shards(tmp_path):
    out = tmp_path / "killed"
    args = ("synthetic:400", "--out", str(out), "--workers", "1", "pack.shard_size=10")
    proc = _pack_cli(*args)
    deadline = time.monotonic() + 60
    while not list(out.glob("*.tar")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: (p.stat().st_mtime_ns, _sha(p)) for p in out.glob("*.tar")}
    assert 0 < len(finished) < 40 and not (out / "manifest.json").exists()
    rerun = _pack_cli(*args)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert "packed 400 images" in stdout
    for name, (mtime, digest) in finished.items():
        assert ((out / name).stat().st_mtime_ns, _sha(out / name)) == (mtime, digest)
    manifest = read_manifest(out)
    assert manifest["total"] == 400 and len(manifest["shards"]) == 40
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) for p in root.rglob("*") if p.is_file()}


def test_corrupt_jpeg_is_one_clear_error_and_skip_bad_counts(tmp_path, capsys):
    src = tmp_path / "src"
    _write_images(src, FILES[:6])
    bad = src / "a" / "bad.jpg"
    bad.write_bytes((src / "a" / "one.jpg").read_bytes()[:600])  # truncated JPEG
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out), "--workers", "1", "--config",
                 str(REPO / "configs/smoke-cpu.yaml"), "pack.shard_size=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pack error: ") and str(bad) in err and len(err.splitlines()) == 1
    before = _tree(out)
    assert not (out / "manifest.json").exists()
    manifest = pack(str(src), out, PackConfig(shard_size=2, val_fraction=0.1, test_fraction=0.1),
                    skip_bad=True)
    assert manifest["skipped"] == 1 and manifest["total"] == 6
    assert all(_tree(out)[name] == digest for name, digest in before.items() if name.endswith(".tar"))


def test_empty_folder_and_bad_sources_are_clear_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(PackError, match=f"{empty}: no image files found"):
        pack(str(empty), tmp_path / "out", CFG)
    assert not (tmp_path / "out").exists()
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--config",
                 str(REPO / "configs/smoke-cpu.yaml")]) == 2
    assert "missing: not a folder" in capsys.readouterr().err
    with pytest.raises(PackError, match="synthetic:N"):
        pack("synthetic:zero", tmp_path / "out", CFG)


def test_out_folder_holding_another_pack_is_refused_and_kept(folder_pack, tmp_path):
    out, _ = folder_pack
    before = _tree(out)
    with pytest.raises(PackError, match=f"{out} already holds a different pack"):
        pack("synthetic:12", out, CFG)
    with pytest.raises(PackError, match="shard_size"):
        pack(str(read_manifest(out)["source"]), out, PackConfig(shard_size=5, val_fraction=0.2,
                                                                test_fraction=0.1))
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(PackError, match=f"{other} exists and is not an empty folder"):
        pack("synthetic:12", other, CFG)
    assert _tree(out) == before and (other / "precious.txt").read_text() == "keep me"
    # The same pack again is a no-op that returns the manifest.
    assert pack(str(read_manifest(out)["source"]), out, CFG) == read_manifest(out)


def test_manifest_errors_name_the_folder(tmp_path):
    with pytest.raises(ManifestError, match=f"{tmp_path / 'nope'} not found.*hybridgan.pack"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(ManifestError, match="no finished pack"):
        read_manifest(tmp_path)


def _mixed_folder(root: Path) -> dict[str, tuple[int, int, int]]:
    """One file of each kind Pillow reads, each a flat colour: relative path -> expected RGB."""
    root.mkdir(parents=True)
    colours = {}
    for i, (name, fmt, mode, params) in enumerate([
        ("anim.gif", "GIF", "P", {}), ("web.webp", "WEBP", "RGB", {"lossless": True}),
        ("scan.tif", "TIFF", "RGB", {}), ("old.bmp", "BMP", "RGB", {}),
        ("print.jpg", "JPEG", "CMYK", {"quality": 100}),
    ]):
        colour = (40 + 40 * i, 200 - 30 * i, 90)
        Image.new("RGB", (300, 260), colour).convert(mode).save(root / name, format=fmt, **params)
        colours[name] = colour
    Image.fromarray(np.full((64, 64), 32896, dtype=np.uint16)).save(root / "deep.png")  # 16-bit grey 128
    colours["deep.png"] = (128, 128, 128)
    (root / "phone.jpg").write_bytes(rotated_jpeg(upright_red_over_blue(256, 256)))
    return colours


def test_every_format_is_packed_with_its_pixels(tmp_path, capsys):
    src = tmp_path / "mixed"
    colours = _mixed_folder(src)
    (src / "notes.txt").write_text("not an image")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    args = [str(src), "--out", str(out), "--config", str(REPO / "configs/smoke-cpu.yaml"), "--workers", "1",
            "pack.val_fraction=0.2", "pack.test_fraction=0.2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{src / 'broken.png'}: not a readable image" in err[0] and "--skip-bad" in err[0]
    assert main([*args, "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 1, not images 1" in printed
    assert "skipped 1 unreadable: broken.png" in printed and "not images: notes.txt" in printed
    manifest = read_manifest(out)
    assert manifest["total"] == 7 and manifest["not_images"] == ["notes.txt"]
    assert [s["file"] for s in manifest["skipped_files"]] == ["broken.png"]
    assert "broken.png: not a readable image" in manifest["skipped_files"][0]["reason"]
    assert not list(out.glob(".*"))  # no temp or skip-list files left behind
    samples = _read_samples(out)
    for name, colour in colours.items():
        pixels = samples[sample_key(name)]["jpg"]
        assert pixels.size == (256, 256)
        mean = np.asarray(pixels, dtype=np.float64).reshape(-1, 3).mean(0)
        assert all(abs(m - c) <= 4 for m, c in zip(mean, colour)), (name, mean, colour)
    phone = samples["phone_jpg"]["jpg"]  # 256x256 but rotated: re-encoded upright, not stored as is
    assert phone.getpixel((128, 30))[0] > 180 and phone.getpixel((128, 225))[2] > 180
    assert samples["phone_jpg"]["__key__"] == "phone_jpg"


def _damage_member(archive: Path, member: str) -> None:
    """Flip bytes in the middle of one member's compressed data."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(member)
    data = bytearray(archive.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for offset in range(start + info.compress_size // 3, start + info.compress_size // 3 + 16):
        data[offset] ^= 0x5A
    archive.write_bytes(bytes(data))


def test_damaged_zip_member_is_one_line_and_skipped_with_skip_bad(image_folder, tmp_path, capsys):
    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel, _, _ in FILES:
            zf.write(image_folder / rel, rel)
    _damage_member(archive, "c/d/e/eight.jpg")
    args = [str(archive), "--out", str(tmp_path / "out"), "--workers", "1", "--config",
            str(REPO / "configs/smoke-cpu.yaml"), "pack.val_fraction=0.2", "pack.test_fraction=0.1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{archive.resolve()}:c/d/e/eight.jpg: damaged zip member" in err[0]
    assert main([*args, "--skip-bad"]) == 0
    assert "skipped 1 unreadable: c/d/e/eight.jpg" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "out")
    assert manifest["total"] == 9 and manifest["skipped_files"][0]["file"] == "c/d/e/eight.jpg"


def test_empty_val_or_test_split_is_refused_at_pack_time(tmp_path):
    with pytest.raises(PackError, match=r"5 images in synthetic:5 give an empty val split "
                                        r"\(train 4, val 0, test 1\): add images or raise pack.val_fraction"):
        pack("synthetic:5", tmp_path / "out", PackConfig(shard_size=4, val_fraction=0.05, test_fraction=0.2))
    assert not (tmp_path / "out").exists()
    with pytest.raises(PackError, match="empty val and test split.*pack.val_fraction and pack.test_fraction"):
        pack("synthetic:5", tmp_path / "out", PackConfig(val_fraction=0.0, test_fraction=0.0))


def _flip_a_byte_inside(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x55  # inside a JPEG: same size, wrong pixels
    shard.write_bytes(bytes(data))


def test_a_rerun_verifies_every_shard_and_repacks_the_damaged_ones_naming_them(tmp_path):
    cfg = PackConfig(shard_size=10, val_fraction=0.1, test_fraction=0.1)
    out = tmp_path / "p"
    first = pack("synthetic:60", out, cfg, workers=1)
    intact = {p.name: (p.stat().st_mtime_ns, _sha(p)) for p in out.glob("*.tar")}
    _flip_a_byte_inside(out / "train-000001.tar")
    size = (out / "train-000002.tar").stat().st_size
    with open(out / "train-000002.tar", "r+b") as handle:
        handle.truncate(1000)
    said: list[str] = []
    assert pack("synthetic:60", out, cfg, workers=1, say=said.append) == first
    assert said == [f"{out / 'train-000001.tar'}: its sha256 differs from the one written; re-packing it from the source",
                    f"{out / 'train-000002.tar'}: 1000 bytes, {size} written; re-packing it from the source"]
    for name, (mtime, digest) in intact.items():
        assert _sha(out / name) == digest
        if name not in ("train-000001.tar", "train-000002.tar"):
            assert (out / name).stat().st_mtime_ns == mtime  # verified, not rewritten
    assert not list(out.glob(".*.done.json"))


def test_a_pack_whose_manifest_was_lost_is_repacked_from_the_source_never_adopted(tmp_path):
    cfg = PackConfig(shard_size=10, val_fraction=0.1, test_fraction=0.1)
    out = tmp_path / "p"
    first = pack("synthetic:40", out, cfg, workers=1)
    digests = {p.name: _sha(p) for p in out.glob("*.tar")}
    (out / "manifest.json").unlink()
    _flip_a_byte_inside(out / "train-000000.tar")
    said: list[str] = []
    again = pack("synthetic:40", out, cfg, workers=1, say=said.append)
    assert len(said) == len(digests) and all("no record of its sha256" in line for line in said)
    assert again["shards"] == first["shards"] and {p.name: _sha(p) for p in out.glob("*.tar")} == digests
