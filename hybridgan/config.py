"""Typed configuration: one dataclass tree, YAML files on top, dotted overrides on the command line.

`load_config("paper", ["train.batch_size=32"])` merges the YAML and the overrides into the schema
below; a config is a YAML file or the name of one shipped in `hybridgan/configs/` (`paper`,
`smoke-cpu`, `folder-1k-cpu`; the checkout's `configs/` is a link to that folder). OmegaConf rejects
unknown keys and wrong types; `_check_ranges` rejects values out of range. Every failure is a `ConfigError` whose single line names the file and the dotted key.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hybridgan.atomic import write_text_atomic


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line naming it."""


PACKAGED_CONFIGS = Path(__file__).parent / "configs"
"""The configs shipped inside the package, each named by its file's stem (`paper`, `smoke-cpu` ...)."""
DEFAULT_CONFIG = "smoke-cpu"


def packaged_config_names() -> list[str]:
    """The names `--config` takes besides a file path: the stems of PACKAGED_CONFIGS' YAML files."""
    return sorted(path.stem for path in PACKAGED_CONFIGS.glob("*.yaml"))


def resolve_config_path(config: str | Path) -> Path:
    """The YAML file `config` names: an existing file as given; a value without `/` and without a
    `.yaml` suffix names a packaged config (ConfigError listing them when there is none of that name);
    anything else is taken as a path (`load_config` reports it when it is missing)."""
    path = Path(config)
    text = str(config)
    if path.is_file() or "/" in text or text.endswith((".yaml", ".yml")):
        return path
    packaged = PACKAGED_CONFIGS / f"{text}.yaml"
    if not packaged.is_file():
        raise ConfigError(f"--config {text!r}: no such file and no packaged config of that name "
                          f"(packaged: {', '.join(packaged_config_names())})")
    return packaged


@dataclass
class RunConfig:
    """`restart_damaged`: start a stage whose checkpoints are all damaged again from step 0 (they
    stay in `damaged-step-*`); without it such a stage is an error on every run."""

    name: str = "smoke"
    root: str = "runs"
    seed: int = 0
    restart_damaged: bool = False


@dataclass
class PackConfig:
    """How `hybridgan.pack` turns a source of images into shards."""

    source_size: int = 256
    jpeg_quality: int = 95
    shard_size: int = 1000
    val_fraction: float = 1 / 30
    test_fraction: float = 1 / 30
    workers: int = 4


@dataclass
class DataConfig:
    """Where the shards are and how the loader reads them."""

    shards: str = "shards/synthetic"
    source: str = "synthetic:2000"
    image_size: int = 128
    crop_fraction: float = 0.9375
    hflip: bool = True
    shuffle_buffer: int = 1000
    workers: int = 2
    resampled: bool = False
    samples_per_epoch: int = 0
    resident: bool = False


@dataclass
class MaskConfig:
    """The hole the generator fills, in the `data.image_size` frame."""

    kind: str = "center"
    hole_size: int = 64
    min_box: int = 32
    max_box: int = 64
    strokes: int = 4
    stroke_width: int = 10


@dataclass
class BlurConfig:
    """Pretraining blur, in the 256x256 source frame."""

    top_left: int = 80
    random_position: bool = False  # true: the square anywhere in the frame instead of at (top_left, top_left)
    min_side: int = 64
    max_side: int = 80
    min_variance: float = 5.0
    max_variance: float = 15.0
    schedule_epochs: int = 0  # > 0: training's variance range moves from the start_* range to [min, max] over these epochs
    start_min_variance: float = 40.0
    start_max_variance: float = 80.0


@dataclass
class GeneratorConfig:
    base_channels: int = 64
    bottleneck: int = 4000
    upsample: str = "transposed"  # transposed: Pathak's 4x4 stride-2 transposed convs; resize: nearest x2 + 3x3 conv
    seam_blend: float = 0.0  # > 0: at composition, the fill's mismatch along the hole's border, smoothed over this many px, is spread into the hole; 0 here so that exports made without the key load as trained, the configs set the measured 4 (docs/quality.md)


@dataclass
class DiscriminatorConfig:
    kind: str = "hybrid"
    decoder_width: int = 32
    full_resolution_block: bool = True
    global_evidence: str = "features"  # features: the paper's head on pooled ResNet features; features+pixels: plus the per-pixel map's soft minimum (hybridgan.models.hybrid)
    resnet_weights: str = ""
    zero_init_residual: bool = False  # from random weights: each residual block starts as the identity (its last BatchNorm scale 0)
    pretrained: str = ""
    from_scratch: bool = False
    min_pretrain_accuracy: float = 0.6  # GAN training refuses a pretraining export whose recorded held-out accuracy is below this (chance is 0.5)
    pathak_channels: int = 64
    pathak_input: str = "hole"


@dataclass
class LossConfig:
    """Weights of eq. 1-6; `global_weight`/`pixel_weight` mix the hybrid D's two outputs."""

    alpha: float = 0.999
    beta: float = 0.001
    gamma: float = 0.5
    epsilon: float = 0.5
    global_weight: float = 0.5
    pixel_weight: float = 0.5
    overlap: int = 4  # width (px) of the band along the hole's inner border whose L2 weighs overlap_weight (0: off; docs/quality.md)
    overlap_weight: float = 10.0  # Pathak's overlapL2Weight
    adversarial: str = "sigmoid_l2"  # lsgan|sigmoid_l2|bce|hinge: how eq. 2/4/5 compare D's score with 0/1 (hybridgan.losses); the configs set the measured choice
    beta_mode: str = "fixed"  # fixed: beta as given; adaptive: beta found at every step (hybridgan.balance)
    adaptive_scale: float = 0.1  # adaptive: the adversarial gradient's norm at G's last layer as this fraction of alpha times the pixel gradient's
    beta_min: float = 0.0  # adaptive: bounds of the found beta
    beta_max: float = 1.0
    adversarial_warmup: int = 0  # steps over which beta ramps linearly from 0 (both modes); D learns from step 1
    blur_objective: str = "sigmoid_l2"  # the pretraining loss's objective (same choices as adversarial)
    blur_pixel_balance: bool = False  # pretraining: the blurred pixels weigh as much as all the others in the per-pixel term


@dataclass
class StageConfig:
    """One training stage (pretrain or train): optimisation, schedule of logs and checkpoints.

    `batch_size` is the GLOBAL batch of one optimiser step, whatever the world size: each of R ranks
    trains on `batch_size / R` images (it must divide). `lr` is used as given unless `lr_scaling`
    asks to scale it with the batch against `reference_batch_size` (the paper's 16):
    `linear` multiplies it by batch_size / reference_batch_size, `sqrt` by the square root of that.
    `epochs` 0 leaves the length to `max_steps` alone (one of them must be > 0).
    `grad_clip` > 0 clips the global gradient norm of every model (DDP and DeepSpeed alike); 0 is off.
    `checkpoint_every_minutes` and `eval_every_minutes` (0 is off) add a cadence in minutes of the
    main process's clock to the one in steps (`checkpoint_every`, `eval_every`; 0 is off too):
    whichever comes first; every epoch's end is checkpointed anyway (docs/fault-tolerance.md).
    `checkpoint_async` writes checkpoints in a background thread from a host copy of the state.
    """

    epochs: int = 5
    batch_size: int = 16
    lr: float = 8e-4
    lr_scaling: str = "none"
    warmup_steps: int = 0  # the learning rate ramps linearly from 0 over these steps
    lr_decay: str = "none"  # "cosine": after the warm-up, a half cosine down to 0 at the stage's last step
    reference_batch_size: int = 16
    grad_clip: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    max_steps: int = 0
    log_every: int = 10
    eval_every: int = 0
    eval_every_minutes: float = 0.0
    eval_batches: int = 8
    checkpoint_every: int = 200
    checkpoint_every_minutes: float = 0.0
    checkpoint_async: bool = True
    keep_checkpoints: int = 2
    mixed_precision: str = "no"
    channels_last: Any = False  # true, false or "auto" (hybridgan.devices)
    compile: bool = False
    cpu: bool = False

    def __post_init__(self) -> None:
        # YAML 1.1 reads a bare `no` (as in `train.mixed_precision=no`) as false
        if self.mixed_precision in ("False", "false"):
            self.mixed_precision = "no"


@dataclass
class EvalConfig:
    batch_size: int = 32
    max_batches: int = 0
    figure_rows: int = 6
    # staged backbone weights of the perceptual metrics (hybridgan.perceptual); "" skips the metric
    lpips_net: str = "alex"
    lpips_weights: str = ""
    inception_weights: str = ""


@dataclass
class TrackingConfig:
    """Where the training stages' scalars and image grids go besides `metrics.jsonl` (which is always
    written): Accelerate's trackers by name (`tensorboard`, `wandb`, `mlflow`, `aim`, `comet_ml`,
    `clearml`, `dvclive`, `swanlab`, `trackio`); [] writes `metrics.jsonl` only. A named tracker
    whose package is missing stops the stage at its start (`hybridgan.tracking`)."""

    backends: list[str] = field(default_factory=lambda: ["tensorboard"])


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    blur: BlurConfig = field(default_factory=BlurConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pretrain: StageConfig = field(default_factory=StageConfig)
    train: StageConfig = field(default_factory=lambda: StageConfig(epochs=15))
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "mask.kind": ("center", "random_box", "strokes"),
    "discriminator.kind": ("hybrid", "pathak", "none"),
    "loss.adversarial": ("lsgan", "sigmoid_l2", "bce", "hinge"),
    "loss.blur_objective": ("lsgan", "sigmoid_l2", "bce", "hinge"),
    "loss.beta_mode": ("fixed", "adaptive"),
    "discriminator.pathak_input": ("hole", "frame"),
    "discriminator.global_evidence": ("features", "features+pixels"),
    "generator.upsample": ("transposed", "resize"),
    "pretrain.mixed_precision": ("no", "fp16", "bf16", "auto"),
    "train.mixed_precision": ("no", "fp16", "bf16", "auto"),
    "pretrain.channels_last": (False, True, "auto"),
    "train.channels_last": (False, True, "auto"),
    "pretrain.lr_scaling": ("none", "linear", "sqrt"),
    "train.lr_scaling": ("none", "linear", "sqrt"),
    "pretrain.lr_decay": ("none", "cosine"),
    "train.lr_decay": ("none", "cosine"),
    "eval.lpips_net": ("alex", "vgg", "squeeze"),
}
_POSITIVE = (
    "data.image_size", "pack.source_size", "pack.shard_size", "pack.workers", "mask.hole_size",
    "generator.base_channels", "generator.bottleneck", "discriminator.decoder_width",
    "discriminator.pathak_channels", "pretrain.batch_size", "train.batch_size", "pretrain.lr",
    "train.lr", "pretrain.log_every", "train.log_every", "pretrain.keep_checkpoints", "train.keep_checkpoints",
    "eval.batch_size", "data.shuffle_buffer", "blur.min_side", "mask.min_box", "mask.strokes",
    "mask.stroke_width", "pretrain.reference_batch_size", "train.reference_batch_size",
)
_NON_NEGATIVE = (
    "pretrain.epochs", "train.epochs", "pretrain.max_steps", "train.max_steps", "data.workers",
    "pretrain.eval_every", "train.eval_every", "data.samples_per_epoch", "eval.max_batches",
    "loss.alpha", "loss.beta", "loss.gamma", "loss.epsilon", "loss.global_weight",
    "loss.pixel_weight", "blur.min_variance", "blur.top_left", "pretrain.eval_batches",
    "train.eval_batches", "eval.figure_rows", "loss.overlap", "loss.overlap_weight",
    "generator.seam_blend", "pretrain.grad_clip", "train.grad_clip",
    "pretrain.checkpoint_every", "train.checkpoint_every", "pretrain.checkpoint_every_minutes",
    "train.checkpoint_every_minutes", "pretrain.eval_every_minutes",
    "train.eval_every_minutes", "loss.adaptive_scale", "loss.beta_min", "loss.adversarial_warmup",
    "pretrain.warmup_steps", "train.warmup_steps", "blur.schedule_epochs", "blur.start_min_variance",
    "run.seed",
)
SEED_LIMIT = 2 ** 32
"""Seeds must be below this: numpy's generator (seeded by Accelerate's `set_seed`) takes 32 bits."""


def _get(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _numbers(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every float and int in a config tree, list items as `key[i]`."""
    if dataclasses.is_dataclass(node):
        return [item for f in dataclasses.fields(node)
                for item in _numbers(getattr(node, f.name), f"{prefix}{f.name}.")]
    if isinstance(node, (list, tuple)):
        return [item for index, value in enumerate(node) for item in _numbers(value, f"{prefix[:-1]}[{index}].")]
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return [(prefix[:-1], node)]
    return []


def _check_finite(cfg: Config) -> None:
    """ConfigError naming the first key (anywhere in the schema) that holds NaN or an infinity: a
    range check such as `x < 0` or `x > 0` lets NaN through, and NaN turns features off silently."""
    for key, value in _numbers(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} must be a finite number")


def _check_ranges(cfg: Config) -> None:
    """Raise ConfigError (message: key and value) for the first value outside its range."""
    _check_finite(cfg)
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {', '.join(map(str, choices))}")
    for key in _POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be > 0")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be >= 0")
    checks = [
        ("run.seed", cfg.run.seed < SEED_LIMIT, f"must be < 2**32 = {SEED_LIMIT}"),
        ("pack.jpeg_quality", 1 <= cfg.pack.jpeg_quality <= 100, "must be in [1, 100]"),
        ("pack.val_fraction", 0 <= cfg.pack.val_fraction < 1, "must be in [0, 1)"),
        ("pack.test_fraction", 0 <= cfg.pack.val_fraction + cfg.pack.test_fraction < 1,
         "plus pack.val_fraction must be < 1"),
        ("data.crop_fraction", 0 < cfg.data.crop_fraction <= 1, "must be in (0, 1]"),
        ("mask.hole_size", cfg.mask.hole_size < cfg.data.image_size,
         f"must be smaller than data.image_size={cfg.data.image_size}"),
        ("mask.max_box", cfg.mask.kind != "random_box"
         or cfg.mask.min_box <= cfg.mask.max_box < cfg.data.image_size,
         "must satisfy mask.min_box <= mask.max_box < data.image_size"),
        ("data.image_size", _power_of_two(cfg.data.image_size) and cfg.data.image_size >= 32,
         "must be a power of two >= 32 (the generator halves it down to 4x4, ResNet50 by 32)"),
        ("mask.hole_size", _power_of_two(cfg.mask.hole_size) and cfg.mask.hole_size >= 8,
         "must be a power of two >= 8 (the generator's up-convolutions double from 4x4)"),
        ("discriminator.pathak_input", cfg.discriminator.kind != "pathak" or cfg.mask.kind == "center"
         or cfg.discriminator.pathak_input == "frame",
         f"judges the centre hole, which mask.kind={cfg.mask.kind!r} does not have; "
         f"set discriminator.pathak_input=frame or mask.kind=center"),
        ("blur.max_side", cfg.blur.min_side <= cfg.blur.max_side, "must be >= blur.min_side"),
        ("blur.max_side", cfg.blur.top_left + cfg.blur.max_side <= cfg.pack.source_size,
         f"plus blur.top_left must fit in pack.source_size={cfg.pack.source_size}"),
        ("blur.max_variance", cfg.blur.min_variance <= cfg.blur.max_variance,
         "must be >= blur.min_variance"),
        ("blur.start_max_variance", cfg.blur.start_min_variance <= cfg.blur.start_max_variance,
         "must be >= blur.start_min_variance"),
        ("loss.beta_max", cfg.loss.beta_min <= cfg.loss.beta_max, "must be >= loss.beta_min"),
        ("discriminator.min_pretrain_accuracy", 0 <= cfg.discriminator.min_pretrain_accuracy <= 1,
         "must be in [0, 1]"),
        ("pretrain.betas", len(cfg.pretrain.betas) == 2 and all(0 <= b < 1 for b in cfg.pretrain.betas),
         "must be two numbers in [0, 1)"),
        ("train.betas", len(cfg.train.betas) == 2 and all(0 <= b < 1 for b in cfg.train.betas),
         "must be two numbers in [0, 1)"),
        # zero epochs would export an untrained model as if it were the stage's result
        ("pretrain.epochs", cfg.pretrain.epochs > 0 or cfg.pretrain.max_steps > 0,
         "must be > 0 unless pretrain.max_steps > 0 (it would export an untrained discriminator)"),
        ("train.epochs", cfg.train.epochs > 0 or cfg.train.max_steps > 0,
         "must be > 0 unless train.max_steps > 0 (it would export an untrained generator)"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key}={_get(cfg, key)!r} {why}")
    _check_backends(cfg.tracking.backends)


def _check_backends(backends: list[str]) -> None:
    """ConfigError naming a tracker that Accelerate does not have, or one named twice."""
    from accelerate.utils import LoggerType

    supported = [tracker.value for tracker in LoggerType if tracker is not LoggerType.ALL]
    for name in backends:
        if name not in supported:
            raise ConfigError(f"tracking.backends: {name!r} is not one of Accelerate's trackers "
                              f"({', '.join(supported)})")
        if backends.count(name) > 1:
            raise ConfigError(f"tracking.backends: {name!r} is named twice")


def _merge(base: Any, other: Any, origin: str) -> Any:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(err).splitlines()[0]
        raise ConfigError(f"{origin}: key '{key}': {reason}") from None


def _mapping(loaded: Any, path: Path) -> DictConfig:
    """The loaded YAML when it is a non-empty mapping of keys; ConfigError naming the file otherwise
    (an empty file would silently give every default, a list cannot be merged into the schema)."""
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: holds a {type(loaded).__name__.removesuffix('Config').lower()}, "
                          f"expected a mapping of keys (run:, data:, train: ...)")
    if not loaded:
        raise ConfigError(f"{path}: empty config file (no keys); write the keys it should set")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults, then the YAML file at `path` (or the packaged config it names:
    `resolve_config_path`), then `key=value` overrides; validated."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = resolve_config_path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # yaml.YAMLError and friends: name the file, keep one line
            raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
        merged = _merge(merged, _mapping(loaded, path), str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override '{item}'")
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, Config)
    try:
        _check_ranges(cfg)
    except ConfigError as err:
        if path is None:
            raise
        raise ConfigError(f"{path}{' with overrides' if overrides else ''}: {err}") from None
    return cfg


def scaled_lr(stage: StageConfig) -> float:
    """The stage's learning rate after its `lr_scaling` rule (see `StageConfig`)."""
    ratio = stage.batch_size / stage.reference_batch_size
    factor = {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[stage.lr_scaling]
    return stage.lr * factor


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML; `load_config` of a file holding it gives back an equal Config."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, to_yaml(cfg))


def cli_parser(module: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
    """The parser of `python -m MODULE`: that usage line (`hybridgan STAGE` when the `hybridgan`
    console script runs it), and `examples` (commands as typed) at the end of its --help."""
    console_script = Path(sys.argv[0]).name == "hybridgan"
    prog = f"hybridgan {module.removeprefix('hybridgan.')}" if console_script else f"python -m {module}"
    return argparse.ArgumentParser(prog=prog, description=description,
                                   epilog="examples:\n" + "\n".join(f"  {example}" for example in examples),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def config_sections_help() -> str:
    """The --help paragraph on the config: each section with its keys, and how to see every value."""
    lines = ["config sections and their keys (override any as SECTION.KEY=VALUE;",
             "--print-config prints every key with its value in the chosen --config):"]
    defaults = Config()
    for section in dataclasses.fields(defaults):
        keys = ", ".join(f.name for f in dataclasses.fields(getattr(defaults, section.name)))
        lines.append(textwrap.fill(keys, width=100, initial_indent=f"  {section.name}: ", subsequent_indent="    "))
    return "\n".join(lines)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE|NAME`, `--print-config` and trailing `key=value` overrides, shared by every
    stage's CLI; the config's sections and keys go into the --help, before its examples (kept
    as written: the parser's formatter becomes argparse's RawDescriptionHelpFormatter)."""
    names = ", ".join(packaged_config_names())
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"YAML config file, or the name of a packaged config: {names} (default {DEFAULT_CONFIG})")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides) as YAML and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=32")
    parser.epilog = config_sections_help() + ("\n\n" + parser.epilog if parser.epilog else "")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    return parse


def out_folder(text: str) -> Path:
    """argparse type: an output folder, existing or not, but not an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is an existing file, not a folder")
    return path


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated Config named by parsed `add_config_arguments` arguments; exits on ConfigError,
    and after printing it (exit code 0) under `--print-config`."""
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    if getattr(args, "print_config", False):
        print(to_yaml(cfg), end="")
        raise SystemExit(0)
    return cfg
