"""Export a model from any checkpoint of a stage, also mid-run: the same file the stage writes at its end.

    python -m hybridgan.export runs/paper/train-hybrid               # the generator of `latest`
    python -m hybridgan.export runs/paper/train-pathak --step 1200   # ... of checkpoints/step-00001200
    python -m hybridgan.export runs/paper/pretrain --out D.safetensors

A train stage (`train-*`) gives its generator, a `pretrain` stage its discriminator, as a
safetensors file with the stage's `config.yaml` in its metadata, so `inpaint`, `evaluate` and
`discriminator.pretrained` take it like the end-of-run export. Default output:
`<stage>/generator-step-NNNNNNNN.safetensors` (`discriminator-...` for pretrain).

`--standalone` writes the generator's whole fill instead (`hybridgan.models.GeneratorFill`: hole
pixels zeroed, G, composition and seam blend, as `inpaint` runs it) as a `torch.export` program,
`.pt2`, that PyTorch alone loads: `torch.export.load(path).module()(image, mask)`. Its source is a
train stage's checkpoint as above or a generator `.safetensors` export (default output: the same
name with `.pt2`):

    python -m hybridgan.export runs/paper/train-hybrid/generator.safetensors --standalone

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
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from hybridgan.config import Config, ConfigError, cli_parser, load_config
from hybridgan.exports import COMPILED_PREFIX, ExportError, save_export
from hybridgan.inpaint import InpaintError, load_generator
from hybridgan.models import ContextEncoder, GeneratorFill, build_discriminator, build_generator


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


def read_deepspeed_weights(checkpoint: Path, engine: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a DeepSpeed engine folder, merged by DeepSpeed (which must be installed)."""
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed reports progress on stdout
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ModuleNotFoundError:
            raise ExportCheckpointError(f"{engine}: a DeepSpeed checkpoint, and DeepSpeed is not installed: "
                                        f"pip install 'hybridgan[deepspeed]'") from None
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=engine.name)


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
            state = read_deepspeed_weights(checkpoint, engine)
        else:
            raise ExportCheckpointError(f"{checkpoint}: no weights of model {index} "
                                        f"({safetensors.name}, {binary.name} or {engine.name}/)")
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ExportCheckpointError(f"{checkpoint}: weights of model {index} unreadable ({err})") from None
    return {key.removeprefix(COMPILED_PREFIX).removeprefix("module."): value for key, value in state.items()}


def checkpoint_model(stage: Path, step: int | None) -> tuple[torch.nn.Module, Config, str, Path]:
    """(model, the stage's config, model name, checkpoint folder) of the stage at `step` (default: latest)."""
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
    return model, cfg, model_name, checkpoint


def export_checkpoint(stage: str | Path, step: int | None = None, out: str | Path | None = None) -> Path:
    """Write the stage's model at `step` (default: latest) as an export; returns the file's path."""
    stage = Path(stage)
    model, cfg, model_name, checkpoint = checkpoint_model(stage, step)
    step_name = checkpoint.name.removeprefix("step-")
    target = Path(out) if out else stage / f"{model_name}-step-{step_name}.safetensors"
    return save_export(model.state_dict(), target, cfg, model_name)


def save_standalone_fill(generator: ContextEncoder, path: str | Path) -> Path:
    """Write `GeneratorFill(generator)` as a `torch.export` program (`.pt2`), any batch size, atomically
    (`generator` is moved to the CPU and put in eval mode).

    The file runs with PyTorch alone: `torch.export.load(path).module()(image, mask)`, tensors as
    `GeneratorFill` describes them, at the generator's own image size.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = GeneratorFill(generator.cpu().eval())
    size = generator.image_size
    image, mask = torch.zeros(2, 3, size, size), torch.zeros(2, 1, size, size)
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        program = torch.export.export(fill, (image, mask), dynamic_shapes={"image": {0: batch}, "mask": {0: batch}})
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")  # torch.export.save warns on a name not ending in .pt2
    torch.export.save(program, str(tmp))
    os.replace(tmp, path)
    return path


def export_standalone(source: str | Path, step: int | None = None, out: str | Path | None = None) -> Path:
    """Write the generator's whole fill as a `.pt2` file (`save_standalone_fill`) from a generator
    `.safetensors` export, or from a train stage's checkpoint at `step` (default: latest)."""
    source = Path(source)
    if source.is_file():
        try:
            generator, _ = load_generator(source)
        except InpaintError as err:
            raise ExportCheckpointError(str(err)) from None
        return save_standalone_fill(generator, Path(out) if out else source.with_suffix(".pt2"))
    model_name, _ = stage_model(source)
    if model_name != "generator":
        raise ExportCheckpointError(f"{source}: --standalone exports a generator; this stage trains the {model_name}")
    model, _, _, checkpoint = checkpoint_model(source, step)
    assert isinstance(model, ContextEncoder)
    step_name = checkpoint.name.removeprefix("step-")
    return save_standalone_fill(model, Path(out) if out else source / f"generator-step-{step_name}.pt2")


def build_parser() -> argparse.ArgumentParser:
    parser = cli_parser("hybridgan.export", __doc__.split("\n\n")[0].splitlines()[0], [
        "python -m hybridgan.export runs/paper/train-hybrid",
        "python -m hybridgan.export runs/paper/train-pathak --step 1200",
        "python -m hybridgan.export runs/paper/train-hybrid/generator.safetensors --standalone"])
    parser.add_argument("stage", type=Path, help="stage folder: runs/NAME/train-hybrid, train-pathak or pretrain "
                                                 "(with --standalone also a generator .safetensors)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest checkpoint)")
    parser.add_argument("--out", type=Path, help="output file (default: <stage>/<model>-step-N.safetensors, "
                                                 "or .pt2 with --standalone)")
    parser.add_argument("--standalone", action="store_true",
                        help="the generator's whole fill as a torch.export .pt2 file that runs without hybridgan")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.standalone and args.step is not None and args.stage.is_file():
        print(f"error: --step reads a stage's checkpoint; {args.stage} is a file", file=sys.stderr)
        return 2
    try:
        if args.standalone:
            path = export_standalone(args.stage, args.step, args.out)
        else:
            path = export_checkpoint(args.stage, args.step, args.out)
    except (ExportCheckpointError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
