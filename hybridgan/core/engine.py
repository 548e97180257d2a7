"""The Accelerator of a stage and what goes into it: each rank's share of the global batch
(`batch_size_per_rank`), the models (`speed_up`, `prepare_model`), their optimisers (`build_adam`,
`stage_lr`) and one backward and step (`backward_and_step`)."""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any

import torch

if not torch.cuda.is_available():
    # DeepSpeed would otherwise probe for an accelerator and log "Setting accelerator to CPU" from
    # every rank, in the middle of the progress bar
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

from hybridgan.config import StageConfig, scaled_lr
from hybridgan.core.errors import TrainingError
from hybridgan.devices import launched_mixed_precision, use_channels_last


MIN_BATCH_PER_RANK = 2
"""BatchNorm in training mode needs two images per rank (the generator's 1x1 bottleneck fails on one)."""


def batch_size_per_rank(stage_key: str, batch: int, world: int) -> int:
    """The global batch `batch` (`stage_key.batch_size`)'s share of each of `world` ranks;
    TrainingError when it does not divide or leaves BatchNorm too few images."""
    if batch % world:
        raise TrainingError(f"{stage_key}.batch_size={batch} (the global batch) is not divisible by the world size "
                            f"{world}")
    if batch // world < MIN_BATCH_PER_RANK:
        raise TrainingError(f"{stage_key}.batch_size={batch} (the global batch) on world size {world} leaves "
                            f"{batch // world} image per rank; BatchNorm needs at least {MIN_BATCH_PER_RANK}: "
                            f"raise the batch (docs/scaling.md) or use fewer ranks")
    return batch // world


def require_deepspeed(models: tuple[str, ...]) -> None:
    """TrainingError naming what is missing when a DeepSpeed launch finds DeepSpeed (or, for one
    engine per model, `transformers`, which Accelerate's several-plugin path imports) not installed."""
    needed = ("deepspeed", "transformers") if len(models) > 1 else ("deepspeed",)
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise TrainingError(f"the launch asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true), and {' and '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'hybridgan[deepspeed]'")


def make_accelerator(stage_cfg: StageConfig, models: tuple[str, ...], trackers: list[GeneralTracker],
                     stage_key: str) -> Accelerator:
    """The Accelerator for whatever `accelerate launch` set up, with the stage's mixed precision
    (`stage_key.mixed_precision`, reconciled with the launcher's: `launched_mixed_precision`),
    logging to `trackers` (`hybridgan.tracking.stage_trackers`).

    Under `accelerate launch --use_deepspeed` a stage that trains several models gets one
    DeepSpeed plugin (engine) per model, named by `models`, each from the launch's settings; on a
    machine without CUDA the process group uses gloo.
    """
    cpu = stage_cfg.cpu or not torch.cuda.is_available()
    precision = launched_mixed_precision(stage_cfg.mixed_precision, cpu, f"{stage_key}.mixed_precision",
                                         os.environ.get("ACCELERATE_MIXED_PRECISION"))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return Accelerator(cpu=cpu, mixed_precision=precision, log_with=trackers or None)
    require_deepspeed(models)
    handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu else []
    plugins = {name: DeepSpeedPlugin() for name in models} if len(models) > 1 else None
    accelerator = Accelerator(mixed_precision=precision, kwargs_handlers=handlers, deepspeed_plugins=plugins,
                              log_with=trackers or None)
    for plugin in accelerator.state.deepspeed_plugins.values():
        # Our loaders are not prepared by Accelerate, so DeepSpeed cannot read the batch size off them;
        # the objective is the DDP path's: clipping only when the stage config asks (0 is off).
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = max(
            1, stage_cfg.batch_size // accelerator.num_processes)
        plugin.deepspeed_config["gradient_clipping"] = stage_cfg.grad_clip
    return accelerator


def prepare_model(accelerator: Accelerator, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  deepspeed: bool) -> tuple[Any, Any]:
    """`accelerator.prepare` of one model and its optimiser; under DeepSpeed each model gets the
    engine of the plugin called `name` (see `make_accelerator`); a bf16/fp16 engine gets its
    buffers in its dtype too, its inputs cast to that dtype and its outputs back to float32, so
    the loops stay unchanged."""
    if deepspeed and len(accelerator.state.deepspeed_plugins or {}) > 1:
        accelerator.state.select_deepspeed_plugin(name)
    model, optimizer = accelerator.prepare(model, optimizer)
    if deepspeed:
        dtype = next(model.module.parameters()).dtype
        if dtype != torch.float32:
            for buffer in model.module.buffers():  # DeepSpeed casts parameters only, not BatchNorm's stats
                if buffer.is_floating_point():
                    buffer.data = buffer.data.to(dtype)
            cast_floating_io(model.module, dtype)
    return model, optimizer


def backward_and_step(accelerator: Accelerator, loss: torch.Tensor, model: Any, optimizer: Any, grad_clip: float,
                      deepspeed: bool) -> torch.Tensor | None:
    """Backward and step of one model: through its own engine under DeepSpeed (Accelerate's
    `backward` drives only the last engine prepared; the engine clips as its config says), else
    zero_grad, `accelerator.backward`, clipping to `grad_clip` when > 0, step. Returns the gradient
    norm (the clipping's, or computed on the device without a sync), or None under DeepSpeed."""
    if deepspeed:
        model.backward(loss)
        model.step()
        return None
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    if grad_clip > 0:
        norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    optimizer.step()
    return norm


def cast_floating_io(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Hooks on `module`: floating-point tensor inputs are cast to `dtype` (the dtype of a DeepSpeed
    bf16/fp16 engine's weights), floating-point tensor outputs back to float32, so that the losses
    are computed in float32 and callers pass float32 as everywhere else."""

    def cast(value: Any, to: torch.dtype) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(to)
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple such as DiscOutput
            return type(value)(*(cast(item, to) for item in value))
        if isinstance(value, (tuple, list)):
            return type(value)(cast(item, to) for item in value)
        if isinstance(value, dict):
            return {key: cast(item, to) for key, item in value.items()}
        return value

    module.register_forward_pre_hook(lambda _module, args: cast(args, dtype))
    module.register_forward_hook(lambda _module, _args, output: cast(output, torch.float32))


def stage_lr(stage_cfg: StageConfig, step: int, total_steps: int) -> float:
    """The stage's learning rate at 0-based `step` of `total_steps`: `scaled_lr`, ramped linearly over
    the first `warmup_steps` steps (step 0 takes 1 / warmup_steps of it), then with `lr_decay: cosine`
    falling along a half cosine from there to 0 after the last step. A function of the step and the
    stage's length alone: a resumed run steps alike (lengthening a run re-draws the decay ahead)."""
    lr = scaled_lr(stage_cfg)
    if stage_cfg.warmup_steps > 0:
        lr *= min(1.0, (step + 1) / stage_cfg.warmup_steps)
    decay_steps = total_steps - stage_cfg.warmup_steps
    if stage_cfg.lr_decay == "cosine" and decay_steps > 0:
        progress = min(1.0, max(0, step - stage_cfg.warmup_steps) / decay_steps)
        lr *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


def build_adam(model: torch.nn.Module, stage_cfg: StageConfig) -> torch.optim.Adam:
    """Adam with the stage's betas and lr (after its `lr_scaling` rule): fused kernels on CUDA and
    on the CPU (PyTorch >= 2.4 has a fused CPU Adam)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=scaled_lr(stage_cfg), betas=tuple(stage_cfg.betas), fused=True)


def check_cpu_compiler(stage_key: str) -> None:
    """TrainingError (one line) when `<stage>.compile=true` on the CPU cannot work: Inductor compiles
    C++ there and finds no compiler (it looks for `CXX`, then g++), instead of failing inside the
    first step."""
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except (exc.InvalidCxxCompiler, OSError) as err:
        raise TrainingError(f"{stage_key}.compile=true: torch.compile on the CPU needs a C++ compiler and found none "
                            f"({type(err).__name__}); install g++ or set CXX, or set {stage_key}.compile=false") from None


def speed_up(model: torch.nn.Module, stage_cfg: StageConfig) -> torch.nn.Module:
    """channels_last memory format and torch.compile, as the stage config asks."""
    if use_channels_last(stage_cfg.channels_last, model):
        model = model.to(memory_format=torch.channels_last)
    if stage_cfg.compile:
        model = torch.compile(model)
    return model
