"""The whole chain (README command 1's module) on a tiny synthetic pack: report, figures, re-runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO, SMOKE, TINY_OVERRIDES
from hybridgan.report import table1, table2
from stage_runs import failure, stage_env


def reproduce(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "hybridgan.reproduce", "--config", str(SMOKE), "--data", "synthetic:80",
               *TINY_OVERRIDES, f"data.shards={tmp_path / 'shards'}", f"run.root={tmp_path / 'runs'}", "run.name=t",
               "pack.shard_size=10", "pack.val_fraction=0.1", "pack.test_fraction=0.1", "pack.workers=1",
               "train.epochs=2", "train.lr=0.002", *extra]
    return subprocess.run(command, cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_chain_writes_the_report_from_the_runs_and_resumes(tmp_path):
    first = reproduce(tmp_path)
    assert first.returncode == 0, failure(first)
    folder = tmp_path / "runs" / "t"
    assert first.stdout.strip().splitlines()[-1].endswith(f"report at {folder / 'report.md'}")
    report = (folder / "report.md").read_text()
    assert table1(folder / "pretrain") in report
    assert table2(folder / "train-hybrid", folder / "train-pathak") in report
    assert (folder / "eval" / "eval.md").read_text().strip() in report
    results = json.loads((folder / "eval" / "eval.json").read_text())
    rows = {row["name"]: row for row in results["runs"]}
    assert rows["train-hybrid"]["metrics"]["psnr"] > rows["mean-colour fill"]["metrics"]["psnr"]
    assert list(rows)[:3] == ["train-none", "train-pathak", "train-hybrid"]  # the no-D baseline first
    assert (folder / "train-none" / "generator.safetensors").is_file()
    assert "**does any discriminator beat no discriminator?**" in report
    with Image.open(folder / "eval" / "figure.png") as figure:
        assert figure.width >= 4 * 128 and figure.height >= 128
    with Image.open(folder / "eval" / "losses.png") as curves:
        assert curves.width > 300 and curves.height > 200

    again = reproduce(tmp_path)
    assert again.returncode == 0, failure(again)
    assert (folder / "report.md").read_text().split("## Stages")[0] == report.split("## Stages")[0]

    changed = reproduce(tmp_path, "train.lr=0.0004")
    assert changed.returncode != 0
    assert "train.lr" in changed.stderr and "different config" in changed.stderr
