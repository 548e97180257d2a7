"""The paper's hybrid discriminator: ResNet50 as the contracting path of a U-Net, two heads.

    image [-1,1] -> ImageNet normalisation -> stem (S/2, 64) -> layer1 (S/4, 256) -> layer2 (S/8, 512)
                 -> layer3 (S/16, 1024) -> layer4 (S/32, 2048) -> avgpool -> Linear: global_score [B]
    layer4 -> up + layer3 -> up + layer2 -> up + layer1 -> up + stem -> up + image -> 1x1 conv:
                                                                                  pixel_score [B, 1, S, S]

Each "up" is a bilinear x2 up-sampling, a concatenation with the skip, and two conv3x3-BN-ReLU; the
decoder widths are 8w, 8w, 4w, 2w, w with w = `cfg.decoder_width`. The last skip is the (normalised)
input image itself, so the per-pixel head sees full-resolution pixels when it judges blur.

`cfg.global_evidence=features+pixels` (a departure, docs/paper.md) adds to the global score the soft
minimum of the per-pixel scores, -log mean exp(-pixel_score): an image is real only where every pixel
is. The paper's head sees ResNet features averaged over the whole image, where a blurred square of 8 %
of the area is a small shift among large differences between faces; the per-pixel map localises it,
and its soft minimum carries that to the global decision (and, in GAN training, asks G for a hole that
is real at every pixel).

`cfg.full_resolution_block=false` (a leaner D, not the paper's) drops that last block: the per-pixel
head judges the S/2 features and its logits are up-sampled bilinearly to S. The full-resolution block
(2w + 3 input channels at S x S) is a large share of the decoder's FLOPs and of its memory traffic.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from hybridgan.config import DiscriminatorConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DiscOutput(NamedTuple):
    """D's raw scores (logits, float32) that the input is real; `pixel_score` is None for Pathak's D.

    The adversarial objective (`loss.adversarial`, hybridgan.losses) decides what a score means:
    a logit whose sigmoid is a probability, or an LSGAN/hinge score compared with 0/1 targets.
    """

    global_score: Tensor
    pixel_score: Tensor | None

    @property
    def global_prob(self) -> Tensor:
        """sigmoid(global_score): the probability of "real" under the probability objectives."""
        return self.global_score.sigmoid()

    @property
    def pixel_prob(self) -> Tensor | None:
        return None if self.pixel_score is None else self.pixel_score.sigmoid()


class ModelWeightsError(ValueError):
    """A missing, unreadable or mismatched weights file; the message is one line naming it."""


def read_state_dict(path: Path, what: str = "resnet50") -> dict[str, Tensor]:
    """The tensors of a local .pth/.pt (tensors-only torch.save) or .safetensors file; any defect is a
    one-line ModelWeightsError naming the file (`what` names the network in the not-found message)."""
    if not path.is_file():
        raise ModelWeightsError(f"{path}: {what} weights file not found")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # garbage, or a pickled object that is more than tensors
        raise ModelWeightsError(f"{path}: not a readable weights file (not a tensors-only torch.save)") from None
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelWeightsError(f"{path}: not a readable weights file ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelWeightsError(f"{path}: does not hold a state dict of tensors")
    return state


def load_resnet_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load a local torchvision resnet50 state dict (.pth/.pt or .safetensors) into `encoder`.

    The classifier (`fc.*`) is ignored. Never downloads; any defect is a ModelWeightsError.
    """
    path = Path(path)
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("fc.")}
    expected = {k: v for k, v in encoder.state_dict().items() if not k.startswith("fc.")}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ModelWeightsError(f"{path}: not resnet50 weights ({len(missing)} keys missing, e.g. "
                                f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ModelWeightsError(f"{path}: {key} has shape {tuple(value.shape)}, "
                                    f"resnet50 expects {tuple(expected[key].shape)}")
    encoder.load_state_dict(state)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last when `x` is laid out so (and not also plain contiguous), else contiguous_format."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
    )


class UpBlock(nn.Module):
    """Bilinear x2 up-sampling, concatenation with the skip, two conv3x3-BN-ReLU."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = _conv_block(in_ch + skip_ch, out_ch)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        # The skip in the up-sampled tensor's dtype and layout: under autocast the input image is
        # float32 and everything else bf16, and a mixed cat is a float32, channels-first copy that
        # the convolution casts and reorders again (4x slower at full resolution; same values).
        skip = skip.to(dtype=x.dtype, memory_format=memory_format_of(x))
        return self.conv(torch.cat([x, skip], dim=1))


def soft_minimum(scores: Tensor) -> Tensor:
    """Per image, -log mean exp(-score) over [B, 1, S, S] scores: the minimum, softened (a constant
    map gives that constant; a low region pulls it down by log of its area share)."""
    flat = -scores.flatten(1)
    return -(torch.logsumexp(flat, dim=1) - math.log(flat.shape[1]))


class HybridDiscriminator(nn.Module):
    """D of the paper: ResNet50 + U-Net, a global and a per-pixel probability of "real"."""

    def __init__(self, cfg: DiscriminatorConfig, image_size: int) -> None:
        super().__init__()
        if image_size % 32:
            raise ValueError(f"image_size={image_size} must be divisible by 32 for the ResNet50 discriminator")
        self.encoder = torchvision.models.resnet50(weights=None, zero_init_residual=cfg.zero_init_residual)
        self.encoder.fc = nn.Identity()  # replaced by the global head; keeps every parameter in use (DDP)
        if cfg.resnet_weights:
            load_resnet_weights(self.encoder, cfg.resnet_weights)
        # images arrive in [-1, 1]; ResNet weights expect ImageNet-normalised [0, 1] images
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        w = cfg.decoder_width
        blocks = [
            UpBlock(2048, 1024, 8 * w),  # S/16
            UpBlock(8 * w, 512, 8 * w),  # S/8
            UpBlock(8 * w, 256, 4 * w),  # S/4
            UpBlock(4 * w, 64, 2 * w),  # S/2
            UpBlock(2 * w, 3, w),  # S
        ]
        if not cfg.full_resolution_block:
            blocks.pop()
        self.decoder = nn.ModuleList(blocks)
        self.global_head = nn.Linear(2048, 1)
        self.pixel_head = nn.Conv2d(w if cfg.full_resolution_block else 2 * w, 1, 1)
        self.pixel_evidence = cfg.global_evidence == "features+pixels"

    def forward(self, image: Tensor) -> DiscOutput:
        x = ((image + 1) / 2 - self.mean) / self.std
        e = self.encoder
        stem = e.relu(e.bn1(e.conv1(x)))
        f1 = e.layer1(e.maxpool(stem))
        f2 = e.layer2(f1)
        f3 = e.layer3(f2)
        f4 = e.layer4(f3)
        d = f4
        for block, skip in zip(self.decoder, (f3, f2, f1, stem, x)):
            d = block(d, skip)
        # scores in float32, so that losses and sigmoids stay exact under bf16/fp16 autocast
        global_score = self.global_head(torch.flatten(e.avgpool(f4), 1)).float().squeeze(1)
        pixel_score = self.pixel_head(d)
        if pixel_score.shape[-2:] != image.shape[-2:]:
            pixel_score = F.interpolate(pixel_score, size=image.shape[-2:], mode="bilinear", align_corners=False)
        pixel_score = pixel_score.float()
        if self.pixel_evidence:
            global_score = global_score + soft_minimum(pixel_score)
        return DiscOutput(global_score, pixel_score)
