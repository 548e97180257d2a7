"""Every command line: one line for a bad argument, never a traceback."""

from __future__ import annotations

import importlib

import pytest

from hybridgan import evaluate


@pytest.mark.parametrize("args, why", [
    (["--batch-size", "-3"], "argument --batch-size: -3 must be >= 1"),
    (["--batch-size", "0"], "argument --batch-size: 0 must be >= 1"),
    (["--max-batches", "-1"], "argument --max-batches: -1 must be >= 0"),
])
def test_evaluate_refuses_counts_out_of_range_in_one_line(args, why, capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["runs/x/train-hybrid", *args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(why)


def test_evaluate_refuses_an_out_that_is_a_file(tmp_path, capsys):
    existing = tmp_path / "eval.json"
    existing.write_text("{}")
    with pytest.raises(SystemExit):
        evaluate.main(["runs/x/train-hybrid", "--out", str(existing)])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"argument --out: {existing} is an existing file, not a folder")
    assert existing.read_text() == "{}"


@pytest.mark.parametrize("module", ["pack", "pretrain", "train", "evaluate", "inpaint", "export", "reproduce", "bench"])
def test_every_help_names_the_module_and_ends_with_example_commands(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"hybridgan.{module}").main(["--help"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert exit_.value.code == 0 and lines[0].startswith(f"usage: python -m hybridgan.{module} ")
    examples = lines[lines.index("examples:") + 1:]
    assert 2 <= len(examples) <= 3 and all(line.startswith(f"  python -m hybridgan.{module} ") for line in examples)
