"""hybridgan.config: YAML + dotted overrides, one-line errors naming the key or file, round trip."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hybridgan.config import (Config, ConfigError, _numbers, add_config_arguments, config_from_args,
                              load_config, save_config)

REPO = Path(__file__).resolve().parents[1]


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_shipped_configs_load():
    paper = load_config(REPO / "configs/paper.yaml")
    assert paper.data.image_size == 128 and paper.mask.hole_size == 64 and paper.loss.alpha == 0.999
    for stage in (paper.pretrain, paper.train):  # saved by time, in the background, whatever the device's speed
        assert (stage.checkpoint_every, stage.checkpoint_every_minutes, stage.checkpoint_async) == (0, 15, True)
    assert (paper.train.eval_every, paper.train.eval_every_minutes) == (0, 15)
    smoke = load_config(REPO / "configs/smoke-cpu.yaml")
    assert smoke.data.source.startswith("synthetic:") and smoke.train.cpu is True


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = _one_line(err)
    assert str(path) in message and "batch_sise" in message


def test_unknown_key_in_override_names_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.imagesize=64"])
    assert "data.imagesize" in _one_line(err)


def test_wrong_type_names_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  image_size: large\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = _one_line(err)
    assert "image_size" in message and str(path) in message
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=fast"])


def test_missing_file_names_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in _one_line(err) and "not found" in str(err.value)


def test_dotted_override_changes_value():
    cfg = load_config(REPO / "configs/paper.yaml", ["train.batch_size=32", "data.hflip=false",
                                                    "blur.max_variance=12.5"])
    assert cfg.train.batch_size == 32 and cfg.data.hflip is False and cfg.blur.max_variance == 12.5
    assert cfg.pretrain.batch_size == 16  # untouched


@pytest.mark.parametrize("override, key", [
    ("data.image_size=0", "data.image_size"),
    ("data.image_size=100", "data.image_size"),
    ("pack.jpeg_quality=101", "pack.jpeg_quality"),
    ("mask.kind=circle", "mask.kind"),
    ("mask.hole_size=128", "mask.hole_size"),
    ("blur.min_variance=-1", "blur.min_variance"),
    ("blur.max_side=200", "blur.max_side"),
    ("data.crop_fraction=1.5", "data.crop_fraction"),
    ("pretrain.epochs=0", "pretrain.epochs"),
    ("train.epochs=0", "train.epochs"),
    ("train.lr_scaling=cubic", "train.lr_scaling"),
    ("pretrain.reference_batch_size=0", "pretrain.reference_batch_size"),
    ("train.grad_clip=-1.0", "train.grad_clip"),
    ("train.checkpoint_every_minutes=-0.5", "train.checkpoint_every_minutes"),
    ("pretrain.eval_every_minutes=-1", "pretrain.eval_every_minutes"),
])
def test_out_of_range_value_names_key_and_value(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = _one_line(err)
    assert message.startswith(key) and override.split("=")[1] in message


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.batch_size"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs/smoke-cpu.yaml", ["run.name=rt", "train.betas=[0.9,0.99]"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert isinstance(again, Config) and again == cfg and again.train.betas == [0.9, 0.99]
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_cli_helpers_exit_with_one_line(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--config", str(REPO / "configs/smoke-cpu.yaml"), "train.epochs=7"])
    assert config_from_args(args).train.epochs == 7
    with pytest.raises(SystemExit) as err:
        config_from_args(parser.parse_args(["--config", str(tmp_path / "x.yaml")]))
    assert str(err.value).startswith("config error: ") and "x.yaml" in str(err.value)


def test_out_of_range_value_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  betas: [0.5, 1.5]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert _one_line(err) == f"{path}: train.betas=[0.5, 1.5] must be two numbers in [0, 1)"


def test_zero_epochs_would_export_an_untrained_model_unless_max_steps_sets_the_length():
    with pytest.raises(ConfigError, match="untrained discriminator"):
        load_config(None, ["pretrain.epochs=0"])
    with pytest.raises(ConfigError, match="untrained generator"):
        load_config(None, ["train.epochs=0", "train.max_steps=0"])
    assert load_config(None, ["train.epochs=0", "train.max_steps=5"]).train.max_steps == 5


def test_batch_size_is_the_global_batch_with_lr_as_given_and_no_clipping_by_default():
    paper = load_config(REPO / "configs/paper.yaml")
    for stage in (paper.pretrain, paper.train):
        assert (stage.batch_size, stage.lr_scaling, stage.reference_batch_size, stage.grad_clip) == (16, "none", 16, 0)


FLOAT_KEYS = [key for key, value in _numbers(Config()) if isinstance(value, float) and "[" not in key]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_key_of_the_schema_refuses_nan_and_infinity_by_name(value):
    assert {"train.lr", "loss.alpha", "loss.overlap_weight", "train.grad_clip",
            "train.checkpoint_every_minutes"} <= set(FLOAT_KEYS)
    for key in FLOAT_KEYS:
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}={value}"])
        assert _one_line(err) == f"{key}={float(value)!r} must be a finite number"
    with pytest.raises(ConfigError, match=r"^train.betas\[1\]=nan must be a finite number$"):
        load_config(None, ["train.betas=[0.5,nan]"])


@pytest.mark.parametrize("text, why", [
    ("- run\n- train\n", "holds a list, expected a mapping of keys"),
    ("", "empty config file (no keys)"),
    ("# only a comment\n", "empty config file (no keys)"),
])
def test_a_yaml_file_that_is_not_a_mapping_of_keys_is_one_line_naming_it(tmp_path, text, why):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert _one_line(err).startswith(f"{path}: {why}")


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_out_of_numpys_range_names_the_key(seed):
    with pytest.raises(ConfigError, match=f"^run.seed={seed} must be"):
        load_config(None, [f"run.seed={seed}"])
