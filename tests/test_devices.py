"""The `auto` stage settings, resolved for the device: bf16 where it is native, channels_last for the hybrid D."""

from __future__ import annotations

import pytest
import torch

from conftest import SMOKE
from hybridgan import devices
from hybridgan.config import ConfigError, DiscriminatorConfig, GeneratorConfig, load_config
from hybridgan.models import ContextEncoder, HybridDiscriminator
from hybridgan.session import speed_up


@pytest.mark.parametrize("flags, fast", [("fpu avx512f avx512_bf16 avx512_vnni", True), ("fpu amx_bf16 amx_tile", True),
                                         ("fpu avx2 avx512f avx512_vnni", False)])
def test_cpu_bf16_from_the_cpuinfo_flags(tmp_path, flags: str, fast: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert devices.cpu_has_fast_bf16(cpuinfo) is fast
    assert devices.cpu_has_fast_bf16(tmp_path / "missing") is False


@pytest.mark.parametrize("fast, expected", [(True, "bf16"), (False, "no")])
def test_auto_precision_on_the_cpu(monkeypatch, fast: bool, expected: str) -> None:
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: fast)
    assert devices.resolve_mixed_precision("auto", cpu=True) == expected
    for setting in ("no", "bf16", "fp16"):
        assert devices.resolve_mixed_precision(setting, cpu=True) == setting


def test_auto_channels_last_for_the_hybrid_discriminator_only() -> None:
    stage = load_config(SMOKE, ["train.channels_last=auto"]).train
    hybrid = speed_up(HybridDiscriminator(DiscriminatorConfig(decoder_width=4), 32), stage)
    generator = speed_up(ContextEncoder(GeneratorConfig(8, 32), 32, 16), stage)
    assert hybrid.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not hybrid.encoder.conv1.weight.is_contiguous()
    assert all(p.is_contiguous() for p in generator.parameters())
    assert devices.use_channels_last(True, generator) and not devices.use_channels_last(False, hybrid)


def test_auto_settings_in_the_config() -> None:
    cfg = load_config(SMOKE, ["train.mixed_precision=auto", "pretrain.channels_last=auto", "train.channels_last=true"])
    assert (cfg.train.mixed_precision, cfg.pretrain.channels_last, cfg.train.channels_last) == ("auto", "auto", True)
    with pytest.raises(ConfigError, match="train.channels_last='fast' is not one of False, True, auto"):
        load_config(SMOKE, ["train.channels_last=fast"])


@pytest.mark.parametrize("setting, launcher, expected", [
    ("auto", None, "no"), ("auto", "no", "no"), ("auto", "bf16", "bf16"), ("auto", "fp16", "fp16"),
    ("bf16", None, "bf16"), ("bf16", "no", "bf16"), ("bf16", "bf16", "bf16"), ("no", "no", "no"),
])
def test_the_launchers_precision_replaces_auto_and_its_default_no_leaves_the_stage_key_alone(
        monkeypatch, setting: str, launcher: str | None, expected: str) -> None:
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)
    assert devices.launched_mixed_precision(setting, True, "train.mixed_precision", launcher) == expected


@pytest.mark.parametrize("setting, launcher", [("no", "bf16"), ("fp16", "bf16"), ("bf16", "fp16")])
def test_a_launcher_precision_that_contradicts_the_stage_key_is_refused_naming_both(setting: str, launcher: str) -> None:
    with pytest.raises(ValueError) as refused:
        devices.launched_mixed_precision(setting, True, "pretrain.mixed_precision", launcher)
    assert str(refused.value) == (f"pretrain.mixed_precision={setting} and the launcher's --mixed_precision {launcher} "
                                  f"(ACCELERATE_MIXED_PRECISION) disagree: set pretrain.mixed_precision={launcher} or "
                                  f"auto, or launch without --mixed_precision")
