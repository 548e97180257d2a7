"""The sweep command: one key over values plus a no-D reference, evaluated together, the frontier."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import tiny_args
from stage_runs import failure, run_stage


@pytest.mark.slow
def test_a_beta_sweep_trains_each_value_and_the_no_d_reference_and_draws_the_frontier(tiny_shards, tmp_path):
    args = tiny_args(tiny_shards, tmp_path, "train.max_steps=2", "loss.adversarial=lsgan")
    result = run_stage("hybridgan.sweep", ["--kind", "pathak", "--values", "0.001,0.1", *args])
    assert result.returncode == 0, failure(result)
    folder = tmp_path / "t" / "sweep-loss.beta"
    for stage in ("none/train-none", "0.001/train-pathak", "0.1/train-pathak"):
        assert (folder / stage / "generator.safetensors").is_file()
    configs = {value: (folder / value / "train-pathak" / "config.yaml").read_text() for value in ("0.001", "0.1")}
    assert "beta: 0.001" in configs["0.001"] and "beta: 0.1" in configs["0.1"]
    results = json.loads((folder / "eval" / "eval.json").read_text())
    assert [row["discriminator"] for row in results["runs"][:3]] == ["none", "pathak", "pathak"]
    table = (folder / "sweep.md").read_text()
    psnr = results["runs"][1]["metrics"]["psnr"]
    assert f"| 0.001 | {psnr:.2f} |" in table and table.count("\n| ") >= 4
    with Image.open(folder / "frontier.png") as image:
        assert image.width > 400 and image.height > 300


def test_a_bad_value_is_refused_before_anything_trains(tiny_shards, tmp_path):
    result = run_stage("hybridgan.sweep", ["--values", "0.001,-1", *tiny_args(tiny_shards, tmp_path)])
    assert result.returncode != 0 and "loss.beta=-1" in result.stderr
    assert not (tmp_path / "t").exists()
