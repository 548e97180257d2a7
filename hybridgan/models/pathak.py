"""Pathak et al.'s CNN discriminator, the baseline of the paper's Table 2.

DCGAN-style: 4x4 stride-2 convs with channels c, 2c, 4c, ... (c = `cfg.pathak_channels`; BatchNorm
on all but the first, LeakyReLU 0.2) from the image size down to 4x4, then a 4x4 conv to one logit
and a sigmoid. Unlike Pathak's, it judges the whole composited image (the hybrid D's input), so
the two discriminators of Table 2 see the same thing.
"""

from __future__ import annotations

from torch import Tensor, nn

from hybridgan.config import DiscriminatorConfig
from hybridgan.models.generator import init_dcgan_weights
from hybridgan.models.hybrid import DiscOutput


class PathakDiscriminator(nn.Module):
    """Global probability of "real" only: `DiscOutput(global_prob [B] float32, pixel_prob=None)`."""

    def __init__(self, cfg: DiscriminatorConfig, image_size: int) -> None:
        super().__init__()
        steps = (image_size // 4).bit_length() - 1
        if image_size < 8 or 4 * 2**steps != image_size:
            raise ValueError(f"image_size={image_size} must be a power of two >= 8 for the Pathak discriminator")
        ch = cfg.pathak_channels
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        for _ in range(steps - 1):
            layers += [nn.Conv2d(ch, 2 * ch, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * ch), nn.LeakyReLU(0.2, inplace=True)]
            ch *= 2
        layers.append(nn.Conv2d(ch, 1, 4, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)

    def forward(self, image: Tensor) -> DiscOutput:
        return DiscOutput(self.net(image).flatten().float().sigmoid(), None)
