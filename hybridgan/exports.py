"""Model exports: a safetensors file that carries the resolved config it was trained with.

`discriminator.safetensors` (pretraining) and `generator.safetensors` (GAN training) are plain
safetensors files; their metadata holds `config` (the run's resolved YAML) and `model` (which
network), so a file alone is enough to rebuild the network that fits its weights, plus what the
stage recorded about it (the discriminator's `test_accuracy`; `export_metadata` reads it). A tensor
holding NaN or an infinity (a diverged model) is never written nor loaded: one line names it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from hybridgan.checkpoint import follow_umask
from hybridgan.config import Config, to_yaml


COMPILED_PREFIX = "_orig_mod."


class ExportError(ValueError):
    """A missing, unreadable or mismatched export; the message names the file."""


def non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding NaN or an infinity, or None (one
    host-device sync for all of them)."""
    named = [(name, tensor) for name, tensor in tensors if tensor.is_floating_point()]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(tensor.detach()).all().to("cpu", non_blocking=True) for _, tensor in named])
    bad = (~finite).nonzero()
    return named[int(bad[0])][0] if bad.numel() else None


def save_export(state_dict: dict[str, torch.Tensor], path: str | Path, cfg: Config, model: str,
                recorded: dict[str, str] | None = None) -> Path:
    """Write `state_dict` to `path` atomically, with `cfg`, the model name and `recorded` in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a torch.compile'd model's state dict names every tensor "_orig_mod.<name>"
    tensors = {key.removeprefix(COMPILED_PREFIX): value.detach().to("cpu").contiguous()
               for key, value in state_dict.items()}
    bad = non_finite(tensors.items())
    if bad is not None:
        raise ExportError(f"{path}: not written: tensor {bad} holds NaN or an infinity (a diverged model)")
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={**(recorded or {}), "config": to_yaml(cfg), "model": model})
    follow_umask(tmp)  # safetensors writes mode 0600
    os.replace(tmp, path)
    return path


def export_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an export (config, model and what its stage recorded); ExportError naming `path`."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ExportError(f"{path}: not a readable safetensors file ({err})") from None


def load_export(path: str | Path, model: str) -> tuple[dict[str, torch.Tensor], Config]:
    """Weights and config of an export; ExportError naming `path` when it is missing or not `model`."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: export not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ExportError(f"{path}: not a readable safetensors file ({err})") from None
    if metadata.get("model") != model:
        raise ExportError(f"{path}: holds model {metadata.get('model')!r}, expected {model!r}")
    bad = non_finite(state.items())
    if bad is not None:
        raise ExportError(f"{path}: tensor {bad} holds NaN or an infinity (a diverged model); "
                          f"it cannot give a meaningful fill")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(metadata["config"]))
        cfg = OmegaConf.to_object(merged)
    except Exception as err:  # noqa: BLE001 - any defect of the metadata is the same one error
        raise ExportError(f"{path}: config metadata unreadable ({err})") from None
    assert isinstance(cfg, Config)
    return state, cfg
