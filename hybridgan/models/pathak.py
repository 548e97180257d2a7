"""Pathak et al.'s CNN discriminator, the baseline of the paper's Table 2.

DCGAN-style: 4x4 stride-2 convs with channels c, 2c, 4c, ... (c = `cfg.pathak_channels`; BatchNorm
on all but the first, LeakyReLU 0.2) from its input size down to 4x4, then a 4x4 conv to one score
(Pathak's `_netlocalD`, whose sigmoid is left to the adversarial objective: hybridgan.losses).

`cfg.pathak_input` says what it judges:
- `hole` (default, Pathak's): the centre `hole_size` square of the composited image, i.e. G's
  prediction for a fake and the original centre for a real face (64x64 of a 128x128 frame). Only
  defined for centre masks; the config refuses it for other mask kinds.
- `frame`: the whole composited image, the hybrid D's input: a departure from Pathak, kept so that
  both discriminators can be compared on the same input (and for random/stroke masks). It costs
  about 4x the FLOPs of `hole` at 128x128.
"""

from __future__ import annotations

from torch import Tensor, nn

from hybridgan.config import DiscriminatorConfig
from hybridgan.data.masks import center_box
from hybridgan.models.generator import init_dcgan_weights
from hybridgan.models.hybrid import DiscOutput


class PathakDiscriminator(nn.Module):
    """A global score of "real" only: `DiscOutput(global_score [B] float32, pixel_score=None)`.

    Takes the whole [B, 3, S, S] image either way; with `hole_size` set it crops the centre square
    itself, so the training loop treats both discriminators alike.
    """

    def __init__(self, cfg: DiscriminatorConfig, image_size: int, hole_size: int | None = None) -> None:
        super().__init__()
        self.crop = None if hole_size is None else center_box(image_size, hole_size)
        size = image_size if hole_size is None else hole_size
        steps = (size // 4).bit_length() - 1
        if size < 8 or 4 * 2**steps != size:
            raise ValueError(f"input size {size} must be a power of two >= 8 for the Pathak discriminator")
        ch = cfg.pathak_channels
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        for _ in range(steps - 1):
            layers += [nn.Conv2d(ch, 2 * ch, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * ch), nn.LeakyReLU(0.2, inplace=True)]
            ch *= 2
        layers.append(nn.Conv2d(ch, 1, 4, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)

    def forward(self, image: Tensor) -> DiscOutput:
        if self.crop is not None:
            top, left, size = self.crop
            image = image[:, :, top:top + size, left:left + size]
        return DiscOutput(self.net(image).flatten().float(), None)
