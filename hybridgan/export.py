"""Export a model from any checkpoint of a stage, also mid-run: the same file the stage writes at its end.

    python -m hybridgan.export runs/paper/train-hybrid               # the generator of `latest`
    python -m hybridgan.export runs/paper/train-pathak --step 1200   # ... of checkpoints/step-00001200
    python -m hybridgan.export runs/paper/pretrain --out D.safetensors

A train stage (`train-*`) gives its generator, a `pretrain` stage its discriminator, as a
safetensors file with the stage's `config.yaml` in its metadata, so `inpaint`, `evaluate` and
`discriminator.pretrained` take it like the end-of-run export. Default output:
`<stage>/generator-step-NNNNNNNN.safetensors` (`discriminator-...` for pretrain).

Checkpoint layouts read (what `accelerator.save_state` writes; the stage prepares the generator
first, so it is model 0 and the discriminator model 1 in a train stage, model 0 in pretrain):

- `model.safetensors`, `model_1.safetensors` (the default), or `pytorch_model.bin`,
  `pytorch_model_1.bin` (safe serialisation off);
- DeepSpeed: the engine folders `pytorch_model/`, `pytorch_model_1/`, merged to fp32 weights by
  DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint` (any ZeRO stage).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from hybridgan.config import Config, ConfigError, cli_parser, load_config
from hybridgan.exports import COMPILED_PREFIX, ExportError, save_export
from hybridgan.models import build_discriminator, build_generator


class ExportCheckpointError(ValueError):
    """A stage, checkpoint or weights file that cannot be exported; the message names it."""


def stage_model(stage: Path) -> tuple[str, int]:
    """(model name, model index in the checkpoint) of a stage folder, from its name."""
    if stage.name == "pretrain":
        return "discriminator", 0
    if stage.name.startswith("train"):
        return "generator", 0
    raise ExportCheckpointError(f"{stage}: not a stage folder (expected pretrain or train-*)")


def find_checkpoint(stage: Path, step: int | None) -> Path:
    """checkpoints/step-N (zero-padded to 8 digits) or the one `checkpoints/latest` names."""
    folder = stage / "checkpoints"
    if step is not None:
        path = folder / f"step-{step:08d}"
        if not path.is_dir():
            have = sorted(p.name for p in folder.glob("step-*")) if folder.is_dir() else []
            raise ExportCheckpointError(f"{path}: no such checkpoint (have: {', '.join(have) or 'none'})")
        return path
    pointer = folder / "latest"
    if not pointer.is_file():
        raise ExportCheckpointError(f"{pointer}: not found; the stage has no checkpoint yet")
    path = folder / pointer.read_text().strip()
    if not path.is_dir():
        raise ExportCheckpointError(f"{pointer}: names {path.name}, which does not exist")
    return path


def read_weights(checkpoint: Path, index: int) -> dict[str, torch.Tensor]:
    """Model `index`'s state dict from an Accelerate checkpoint folder, in any layout listed above."""
    suffix = "" if index == 0 else f"_{index}"
    safetensors, binary = checkpoint / f"model{suffix}.safetensors", checkpoint / f"pytorch_model{suffix}.bin"
    engine = checkpoint / f"pytorch_model{suffix}"
    try:
        if safetensors.is_file():
            state = load_file(str(safetensors))
        elif binary.is_file():
            state = torch.load(binary, map_location="cpu", weights_only=True)
        elif engine.is_dir():
            with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed reports progress on stdout
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=engine.name)
        else:
            raise ExportCheckpointError(f"{checkpoint}: no weights of model {index} "
                                        f"({safetensors.name}, {binary.name} or {engine.name}/)")
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ExportCheckpointError(f"{checkpoint}: weights of model {index} unreadable ({err})") from None
    return {key.removeprefix(COMPILED_PREFIX).removeprefix("module."): value for key, value in state.items()}


def export_checkpoint(stage: str | Path, step: int | None = None, out: str | Path | None = None) -> Path:
    """Write the stage's model at `step` (default: latest) as an export; returns the file's path."""
    stage = Path(stage)
    model_name, index = stage_model(stage)
    try:
        cfg: Config = load_config(stage / "config.yaml")
    except ConfigError as err:
        raise ExportCheckpointError(str(err)) from None
    checkpoint = find_checkpoint(stage, step)
    state = read_weights(checkpoint, index)
    model = build_generator(cfg) if model_name == "generator" else build_discriminator(cfg, "hybrid")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ExportCheckpointError(f"{checkpoint}: weights do not fit the {model_name} of {stage / 'config.yaml'} "
                                    f"({str(err).splitlines()[0]})") from None
    step_name = checkpoint.name.removeprefix("step-")
    target = Path(out) if out else stage / f"{model_name}-step-{step_name}.safetensors"
    return save_export(model.state_dict(), target, cfg, model_name)


def build_parser() -> argparse.ArgumentParser:
    parser = cli_parser("hybridgan.export", __doc__.split("\n\n")[0].splitlines()[0], [
        "python -m hybridgan.export runs/paper/train-hybrid",
        "python -m hybridgan.export runs/paper/train-pathak --step 1200",
        "python -m hybridgan.export runs/paper/pretrain --out D.safetensors"])
    parser.add_argument("stage", type=Path, help="stage folder: runs/NAME/train-hybrid, train-pathak or pretrain")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest checkpoint)")
    parser.add_argument("--out", type=Path, help="output file (default: <stage>/<model>-step-N.safetensors)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = export_checkpoint(args.stage, args.step, args.out)
    except (ExportCheckpointError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
