"""The networks: Pathak's context encoder (G), the hybrid ResNet50 + U-Net D, Pathak's CNN D."""

from __future__ import annotations

from torch import nn

from hybridgan.config import Config
from hybridgan.models.generator import ContextEncoder, GeneratorFill
from hybridgan.models.hybrid import DiscOutput, HybridDiscriminator, ModelWeightsError, load_resnet_weights
from hybridgan.models.pathak import PathakDiscriminator
from hybridgan.models.summary import model_summary

__all__ = [
    "ContextEncoder", "DiscOutput", "GeneratorFill", "HybridDiscriminator", "ModelWeightsError", "PathakDiscriminator",
    "build_discriminator", "build_generator", "load_resnet_weights", "model_summary",
]


def build_generator(cfg: Config) -> ContextEncoder:
    """G for `cfg`: a hole-sized prediction for centre masks (Pathak), an image-sized one otherwise."""
    size, hole = cfg.data.image_size, cfg.mask.hole_size
    return ContextEncoder(cfg.generator, size, hole, output_size=hole if cfg.mask.kind == "center" else size)


def build_discriminator(cfg: Config, kind: str | None = None) -> nn.Module:
    """D of `kind` ("hybrid" or "pathak"; default `cfg.discriminator.kind`), randomly initialised.

    The hybrid D loads `cfg.discriminator.resnet_weights` into its encoder when set; loading a
    pretrained export (`cfg.discriminator.pretrained`) is the training loop's job. Pathak's D judges
    the centre hole or the whole frame, as `cfg.discriminator.pathak_input` says.
    """
    kind = kind or cfg.discriminator.kind
    if kind == "hybrid":
        return HybridDiscriminator(cfg.discriminator, cfg.data.image_size)
    if kind == "pathak":
        hole = cfg.mask.hole_size if cfg.discriminator.pathak_input == "hole" else None
        return PathakDiscriminator(cfg.discriminator, cfg.data.image_size, hole)
    raise ValueError(f"discriminator kind {kind!r} is not one of hybrid, pathak")
