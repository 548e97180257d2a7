"""inpaint CLI on odd-size user photos with an untrained tiny generator export."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hybridgan.config import load_config
from hybridgan.exports import save_export
from hybridgan.inpaint import Crop, default_mask, main
from hybridgan.models import build_generator

TINY = ["data.image_size=32", "mask.hole_size=16", "generator.base_channels=8", "generator.bottleneck=32"]
WIDTH, HEIGHT = 301, 233


def export_generator(path: Path, overrides: list[str] = ()) -> Path:
    torch.manual_seed(0)
    cfg = load_config(None, TINY + list(overrides))
    return save_export(build_generator(cfg).state_dict(), path, cfg, "generator")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inpaint")
    stage = root / "runs" / "tiny" / "train-hybrid"
    export_generator(stage / "generator.safetensors")
    export_generator(root / "free.safetensors", ["mask.kind=random_box", "mask.min_box=8", "mask.max_box=16"])
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    smooth = np.stack([xx / WIDTH, yy / HEIGHT, (xx + yy) / (WIDTH + HEIGHT)], axis=-1) * 200
    photo = (smooth + rng.integers(0, 50, (HEIGHT, WIDTH, 3))).astype(np.uint8)
    Image.fromarray(photo).save(root / "face.png")
    Image.fromarray(photo[::-1]).save(root / "other.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def changed_only_inside(out: Path, original: Path, mask: np.ndarray) -> None:
    result, photo = read(out), read(original)
    assert result.shape == photo.shape == (HEIGHT, WIDTH, 3)
    assert np.array_equal(result[~mask], photo[~mask])  # exact outside the hole
    assert (result[mask] != photo[mask]).any()


def test_default_centre_hole_at_original_resolution(workdir, capsys):
    out = workdir / "out-default"
    rc = main(["--generator", str(workdir / "runs/tiny/train-hybrid"), str(workdir / "face.png"),
               str(workdir / "other.png"), "--out", str(out)])
    assert rc == 0
    mask = default_mask(load_config(None, TINY), WIDTH, HEIGHT)
    # crop 233x233 at column 34; the 16/32 centre hole scaled by 233/32 = 7.28: rows 59..173 (174.75 exclusive)
    assert Crop.of(WIDTH, HEIGHT) == Crop(0, 34, 233)
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (59, 173, 34 + 59, 34 + 173)
    changed_only_inside(out / "face_inpainted.png", workdir / "face.png", mask)
    changed_only_inside(out / "other_inpainted.png", workdir / "other.png", mask)
    side = Image.open(out / "face_side_by_side.png")
    assert side.size == (3 * WIDTH + 4 * 4, 14 + HEIGHT + 2 * 4)
    assert str(out / "face_inpainted.png") in capsys.readouterr().out


def test_box_and_mask_png(workdir):
    out = workdir / "out-box"
    assert main(["--generator", str(workdir / "runs/tiny/train-hybrid/generator.safetensors"),
                 str(workdir / "face.png"), "--out", str(out), "--box", "80,100,40,50"]) == 0
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[80:120, 100:150] = True
    changed_only_inside(out / "face_inpainted.png", workdir / "face.png", mask)

    free = np.zeros((HEIGHT, WIDTH), dtype=bool)
    free[10:60, 40:90] = True  # off-centre: needs a generator trained on free holes
    Image.fromarray(free.astype(np.uint8) * 255).save(workdir / "hole.png")
    out = workdir / "out-mask"
    assert main(["--generator", str(workdir / "free.safetensors"), str(workdir / "face.png"),
                 "--out", str(out), "--mask", str(workdir / "hole.png")]) == 0
    changed_only_inside(out / "face_inpainted.png", workdir / "face.png", free)


def test_bad_inputs_name_the_file_and_keep_other_outputs(workdir, capsys):
    out = workdir / "out-bad"
    gen = str(workdir / "runs/tiny/train-hybrid")
    assert main(["--generator", gen, str(workdir / "broken.jpg"), str(workdir / "face.png"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.jpg: not a readable image" in err[0]
    assert (out / "face_inpainted.png").is_file() and not (out / "broken_inpainted.png").exists()

    Image.new("L", (WIDTH, HEIGHT - 1), 255).save(workdir / "small.png")
    assert main(["--generator", gen, str(workdir / "face.png"), "--out", str(out),
                 "--mask", str(workdir / "small.png")]) == 1
    assert "small.png: mask is 301x232, the photo is 301x233" in capsys.readouterr().err
    assert (out / "face_inpainted.png").is_file()  # an earlier output is not removed

    assert main(["--generator", gen, str(workdir / "face.png"), "--out", str(out), "--box", "0,0,10,10"]) == 1
    assert "100 hole pixels lie outside the centre crop" in capsys.readouterr().err
    assert main(["--generator", gen, str(workdir / "face.png"), "--out", str(out), "--box", "5,40,20,20"]) == 1
    assert "outside the central 16x16 hole this generator fills" in capsys.readouterr().err
    assert main(["--generator", gen, str(workdir / "face.png"), "--out", str(out), "--box", "200,40,50,20"]) == 1
    assert "reaches outside the 301x233 photo" in capsys.readouterr().err


def test_missing_generator(workdir, capsys):
    missing = workdir / "runs/none/train-hybrid"
    assert main(["--generator", str(missing), str(workdir / "face.png"), "--out", str(workdir / "x")]) == 2
    assert f"{missing}: generator export not found" in capsys.readouterr().err
    empty = workdir / "runs/empty"
    empty.mkdir(parents=True)
    assert main(["--generator", str(empty), str(workdir / "face.png"), "--out", str(workdir / "x")]) == 2
    assert f"{empty}: no generator.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--generator", str(empty), str(workdir / "face.png"), "--out", "x", "--box", "1,2,3"])


def test_a_folder_with_keep_names(workdir, capsys):
    photos = workdir / "photos"
    photos.mkdir()
    for name in ("face.png", "other.png"):
        (photos / name).write_bytes((workdir / name).read_bytes())
    (photos / "notes.txt").write_text("not a photo")
    out = workdir / "out-kept"
    gen = str(workdir / "runs/tiny/train-hybrid")
    assert main(["--generator", gen, str(photos), "--out", str(out), "--keep-names"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["face.png", "other.png"]
    mask = default_mask(load_config(None, TINY), WIDTH, HEIGHT)
    changed_only_inside(out / "face.png", photos / "face.png", mask)
    changed_only_inside(out / "other.png", photos / "other.png", mask)
    # the same fill as the default naming writes
    assert main(["--generator", gen, str(photos / "face.png"), "--out", str(workdir / "out-named")]) == 0
    assert np.array_equal(read(out / "face.png"), read(workdir / "out-named" / "face_inpainted.png"))
    capsys.readouterr()
    assert main(["--generator", gen, str(photos), "--out", str(photos), "--keep-names"]) == 2
    assert "--keep-names would overwrite it" in capsys.readouterr().err
    assert read(photos / "face.png").tolist() == read(workdir / "face.png").tolist()


def fake_checkpoint(stage: Path, step: int, state: dict[str, torch.Tensor], cfg, name: str = "model.safetensors") -> Path:
    """The files of `accelerator.save_state` that export reads: config.yaml, step-N/model*, latest."""
    from safetensors.torch import save_file

    from hybridgan.config import save_config

    folder = stage / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    save_config(cfg, stage / "config.yaml")
    if name.endswith(".bin"):
        torch.save(state, folder / name)
    else:
        save_file({f"_orig_mod.{k}": v.contiguous() for k, v in state.items()}, str(folder / name))
    (stage / "checkpoints" / "latest").write_text(folder.name)
    return folder


def test_export_from_a_checkpoint_mid_run(workdir, capsys):
    from hybridgan.export import main as export_main
    from hybridgan.exports import load_export

    cfg = load_config(None, TINY)
    stage = workdir / "runs" / "mid" / "train-pathak"
    early, late = (build_generator(cfg).state_dict() for _ in range(2))
    fake_checkpoint(stage, 10, early, cfg)
    fake_checkpoint(stage, 20, late, cfg, name="pytorch_model.bin")
    assert export_main([str(stage)]) == 0
    latest = stage / "generator-step-00000020.safetensors"
    assert capsys.readouterr().out.strip() == str(latest)
    state, saved_cfg = load_export(latest, "generator")
    assert all(torch.equal(state[k], late[k]) for k in late) and saved_cfg == cfg
    assert export_main([str(stage), "--step", "10", "--out", str(workdir / "g10.safetensors")]) == 0
    state, _ = load_export(workdir / "g10.safetensors", "generator")
    assert all(torch.equal(state[k], early[k]) for k in early)
    # the export is what inpaint takes
    assert main(["--generator", str(latest), str(workdir / "face.png"), "--out", str(workdir / "out-mid")]) == 0
    capsys.readouterr()
    assert export_main([str(stage), "--step", "30"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {stage / 'checkpoints' / 'step-00000030'}: no such "
                                               "checkpoint (have: step-00000010, step-00000020)")
    wrong = workdir / "runs" / "wrong" / "train-hybrid"
    fake_checkpoint(wrong, 5, early, load_config(None, TINY[:-1] + ["generator.bottleneck=16"]))
    assert export_main([str(wrong)]) == 2
    assert "weights do not fit the generator of" in capsys.readouterr().err


def test_a_generator_with_non_finite_weights_or_buffers_is_refused_naming_the_tensor(workdir, capsys):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    from hybridgan.exports import ExportError

    source = workdir / "runs/tiny/train-hybrid/generator.safetensors"
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(source))
    buffer = next(name for name in state if name.endswith("running_var"))
    state[buffer] = torch.full_like(state[buffer], float("inf"))  # what lr=1e10 left in an export
    diverged = workdir / "diverged.safetensors"
    save_file(state, str(diverged), metadata=metadata)
    assert main(["--generator", str(diverged), str(workdir / "face.png"), "--out", str(workdir / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {diverged}: tensor {buffer} holds NaN or an infinity (a diverged model); "
                   f"it cannot give a meaningful fill")
    assert not (workdir / "x").exists()
    with pytest.raises(ExportError, match=f"tensor {buffer} holds NaN or an infinity"):
        save_export(state, workdir / "never.safetensors", load_config(None, TINY), "generator")
    assert not (workdir / "never.safetensors").exists()


def test_two_inputs_with_one_output_name_are_refused_naming_both(workdir, capsys):
    for folder in ("a", "b"):
        (workdir / folder).mkdir(exist_ok=True)
        (workdir / folder / "p1.png").write_bytes((workdir / "face.png").read_bytes())
    out = workdir / "out-clash"
    gen = str(workdir / "runs/tiny/train-hybrid")
    assert main(["--generator", gen, str(workdir / "a/p1.png"), str(workdir / "b/p1.png"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {workdir / 'a/p1.png'} and {workdir / 'b/p1.png'} would both be written to "
        f"{out / 'p1_inpainted.png'}; inpaint them into different --out folders")
    assert not out.exists()
    assert main(["--generator", gen, str(workdir / "a"), str(workdir / "b"), "--out", str(out), "--keep-names"]) == 2
    assert "would both be written to" in capsys.readouterr().err


def test_an_out_that_is_a_file_and_a_negative_box_are_one_line_each(workdir, capsys):
    gen = str(workdir / "runs/tiny/train-hybrid")
    with pytest.raises(SystemExit):
        main(["--generator", gen, str(workdir / "face.png"), "--out", str(workdir / "face.png")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"argument --out: {workdir / 'face.png'} is an existing file, not a folder")
    with pytest.raises(SystemExit):
        main(["--generator", gen, str(workdir / "face.png"), "--out", str(workdir / "x"), "--box", "-1,2,30,30"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("argument --box: --box '-1,2,30,30': need TOP, LEFT >= 0 and H, W > 0")


STANDALONE_RUNNER = """
import sys
sys.modules["hybridgan"] = None  # any import of this package fails: the file must run on PyTorch alone
import torch
fill = torch.export.load(sys.argv[1]).module()
image, mask = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(fill(image, mask), sys.argv[3])
"""


@pytest.mark.parametrize("overrides, box", [
    (["generator.seam_blend=4"], None),  # centre hole, hole-sized prediction, seam blend on
    (["mask.kind=random_box", "mask.min_box=8", "mask.max_box=16"], (5, 9, 12, 10)),  # image-sized prediction
])
def test_the_standalone_export_runs_without_hybridgan_and_fills_the_pixels_inpaint_does(tmp_path, overrides, box):
    from hybridgan.export import main as export_main
    from hybridgan.inpaint import box_mask, inpaint, load_generator
    from hybridgan.models import GeneratorFill

    source = export_generator(tmp_path / "generator.safetensors", overrides)
    assert export_main([str(source), "--standalone"]) == 0
    standalone = tmp_path / "generator.pt2"
    generator, cfg = load_generator(source)
    size = cfg.data.image_size
    photo = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    hole = default_mask(cfg, size, size) if box is None else box_mask(box, size, size)
    image = torch.from_numpy(photo).permute(2, 0, 1).float().div(127.5).sub(1)[None]  # NCHW in [-1, 1]
    mask = torch.from_numpy(hole).float()[None, None]  # 1 in the hole
    torch.save((image, mask), tmp_path / "inputs.pt")

    runner = subprocess.run([sys.executable, "-c", STANDALONE_RUNNER, str(standalone), str(tmp_path / "inputs.pt"),
                             str(tmp_path / "filled.pt")], cwd=tmp_path, capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=300)
    assert runner.returncode == 0, runner.stderr[-3000:]
    filled = torch.load(tmp_path / "filled.pt")
    with torch.no_grad():
        assert (filled - GeneratorFill(generator)(image, mask)).abs().max() < 1e-5
    pixels = ((filled[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    expected = inpaint(generator, photo, hole)
    assert np.array_equal(pixels, expected)
    assert np.array_equal(pixels[~hole], photo[~hole]) and (pixels[hole] != photo[hole]).any()


def test_the_standalone_export_of_a_stage_reads_its_checkpoint(workdir, capsys):
    from hybridgan.export import main as export_main
    from hybridgan.models import GeneratorFill

    cfg = load_config(None, TINY)
    generator = build_generator(cfg).eval()
    stage = workdir / "runs" / "standalone" / "train-hybrid"
    fake_checkpoint(stage, 7, generator.state_dict(), cfg)
    assert export_main([str(stage), "--standalone"]) == 0
    written = stage / "generator-step-00000007.pt2"
    assert capsys.readouterr().out.strip() == str(written)
    image, mask = torch.rand(3, 3, 32, 32) * 2 - 1, torch.zeros(3, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    with torch.no_grad():
        assert torch.equal(torch.export.load(written).module()(image, mask), GeneratorFill(generator)(image, mask))
    assert export_main([str(workdir / "free.safetensors"), "--standalone", "--step", "7"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --step reads a stage's checkpoint; "
                                               f"{workdir / 'free.safetensors'} is a file")


def test_the_standalone_export_takes_a_generator_only(workdir, capsys):
    from hybridgan.export import main as export_main

    stage = workdir / "runs" / "d" / "pretrain"
    cfg = load_config(None, TINY)
    fake_checkpoint(stage, 3, {"weight": torch.zeros(1)}, cfg)
    assert export_main([str(stage), "--standalone"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {stage}: --standalone exports a generator; "
                                               f"this stage trains the discriminator")
