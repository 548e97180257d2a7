"""Every command line: one line for a bad argument, never a traceback."""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
import tomllib

import pytest
import yaml

from conftest import REPO
from hybridgan import cli, evaluate
from hybridgan.config import PACKAGED_CONFIGS, Config, ConfigError, load_config, packaged_config_names


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


CONFIG_MODULES = ["pack", "pretrain", "train", "reproduce", "sweep", "bench"]
OWN_ARGUMENTS = {"pack": ["synthetic:10"], "sweep": ["--values", "1"], "bench": ["train"]}
"""What each module needs before the config arguments (bench: a subcommand, which holds them)."""


@pytest.mark.parametrize("module", CONFIG_MODULES)
def test_every_config_help_lists_each_config_section_and_how_to_see_every_key(module, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(f"hybridgan.{module}").main([*OWN_ARGUMENTS.get(module, []), "--help"])
    out = capsys.readouterr().out
    sections = out[out.index("config sections"):].split("examples:")[0]
    assert "--print-config prints every key" in sections
    listed = [line.split(":")[0].strip() for line in sections.splitlines()[2:] if line.startswith("  ") and ":" in line]
    assert listed == [f.name for f in dataclasses.fields(Config)]
    assert "  train: epochs, batch_size, lr," in sections


@pytest.mark.parametrize("module", CONFIG_MODULES)
def test_print_config_prints_the_file_and_overrides_as_yaml_and_exits_0(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"hybridgan.{module}").main(
            [*OWN_ARGUMENTS.get(module, []), "--config", "paper", "--print-config", "train.lr=0.125", "run.name=printed"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert list(printed) == [f.name for f in dataclasses.fields(Config)]
    assert printed["train"]["lr"] == 0.125 and printed["run"]["name"] == "printed"
    assert printed["data"]["shards"] == "shards/celeba-hq"  # paper.yaml's own value


def test_a_packaged_config_name_works_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert packaged_config_names() == ["folder-1k-cpu", "paper", "smoke-cpu"]
    for name in packaged_config_names():
        assert load_config(name) == load_config(REPO / "configs" / f"{name}.yaml")


def test_the_checkout_configs_folder_is_the_packaged_one():
    assert (REPO / "configs").resolve() == PACKAGED_CONFIGS.resolve()
    assert (REPO / "configs" / "accelerate" / "multi-gpu.yaml").is_file()


def test_an_unknown_config_name_is_one_error_listing_the_packaged_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config("papr")
    assert str(err.value) == ("--config 'papr': no such file and no packaged config of that name "
                              "(packaged: folder-1k-cpu, paper, smoke-cpu)")
    with pytest.raises(ConfigError, match=r"^papr\.yaml: config file not found$"):
        load_config("papr.yaml")


def test_a_file_in_the_working_folder_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "paper").write_text("run:\n  name: mine\n")
    assert load_config("paper").run.name == "mine"


def test_the_default_config_works_outside_the_checkout_and_pack_out_defaults_to_data_shards(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)

    help_ = run("-m", "hybridgan.train", "--help")
    assert help_.returncode == 0 and "default smoke-cpu" in " ".join(help_.stdout.split())
    packed = run("-m", "hybridgan.pack", "synthetic:20", "--workers", "1", "pack.shard_size=10")
    assert packed.returncode == 0, packed.stderr[-2000:]
    manifest = json.loads((tmp_path / "shards" / "synthetic" / "manifest.json").read_text())  # smoke-cpu's data.shards
    assert sum(shard["count"] for shard in manifest["shards"]) == 20


def test_the_console_script_is_declared_and_runs_each_stage_main(capsys):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"hybridgan": "hybridgan.cli:main"}
    assert list(cli.STAGES) == ["pack", "pretrain", "train", "evaluate", "inpaint", "export", "reproduce", "bench",
                                "sweep"]
    for stage in cli.STAGES:
        assert callable(importlib.import_module(f"hybridgan.{stage}").main)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--config", "smoke-cpu", "--print-config", "train.epochs=2"])
    assert exit_.value.code == 0 and yaml.safe_load(capsys.readouterr().out)["train"]["epochs"] == 2


def test_a_stage_run_by_the_console_script_shows_that_usage(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/hybridgan", "export", "--help"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: hybridgan export ")


def test_the_console_script_names_an_unknown_stage_and_lists_the_stages(capsys):
    assert cli.main(["trian"]) == 2
    assert capsys.readouterr().err.strip() == ("hybridgan: unknown stage 'trian' (stages: pack, pretrain, train, "
                                               "evaluate, inpaint, export, reproduce, bench, sweep)")
    assert cli.main(["--help"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "usage: hybridgan STAGE [arguments ...]"
    assert cli.main([]) == 2
    usage = capsys.readouterr().err.splitlines()
    assert usage[0] == "usage: hybridgan STAGE [arguments ...]" and "  train      train the generator against a discriminator" in usage


def test_a_stage_command_ends_its_process_group_after_success_only(monkeypatch, capsys):
    """Success: the group is destroyed (gloo left to the interpreter's exit can abort a finished rank).
    Failure: it is not (another rank may still be inside a collective); the error stays one line."""
    from hybridgan.core import cli as stage_cli
    from hybridgan.core.errors import TrainingError

    ended: list[str] = []
    monkeypatch.setattr(stage_cli, "end_process_group", lambda: ended.append("ended"))
    seen: list[int] = []

    def succeeds(cfg: Config) -> None:
        seen.append(cfg.train.epochs)

    def fails(cfg: Config) -> None:
        raise TrainingError("runs/x/train-hybrid: broken")

    stage_cli.run_stage_cli(succeeds, "a stage", ["train.epochs=5"])
    assert seen == [5] and ended == ["ended"]
    with pytest.raises(SystemExit) as exit_:
        stage_cli.run_stage_cli(fails, "a stage", [])
    assert exit_.value.code == 1 and ended == ["ended"]
    assert capsys.readouterr().err == "error: runs/x/train-hybrid: broken\n"


def test_end_process_group_destroys_a_real_group_and_is_a_no_op_without_one():
    import torch.distributed as dist

    from hybridgan.distributed import end_process_group
    from stage_runs import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    end_process_group()
    assert not dist.is_initialized()
    end_process_group()
    assert not dist.is_initialized()
