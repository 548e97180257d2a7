"""Pathak et al.'s context encoder (CVPR 2016), the generator G of eq. 1-3.

Encoder: 4x4 stride-2 convs (BatchNorm, LeakyReLU 0.2) from the image size down to 4x4, then a 4x4
conv to a 1x1 bottleneck of `cfg.bottleneck` channels (Pathak: 4000). Decoder: a 4x4 transposed conv
to 4x4, then x2 steps (BatchNorm, ReLU) back up to `output_size`, tanh. Each x2 step is, by
`cfg.upsample`, Pathak's 4x4 stride-2 transposed conv (`transposed`) or a nearest-neighbour x2 resize
followed by a 3x3 conv (`resize`, Odena et al. 2016), which cannot produce the checkerboard that the
uneven overlap of transposed-conv kernels leaves. Channel widths follow Pathak's code: base, base,
2*base, 4*base, 8*base (capped at 8*base) on the way down, the mirror on the way up. With base 64,
bottleneck 4000, 128x128 in and 64x64 out this is Pathak's 71.1 M-parameter network.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hybridgan.config import GeneratorConfig
from hybridgan.data.masks import center_box
from hybridgan.models.layers import WholeInputConv2d, WholeOutputConvTranspose2d


def _steps_from_4(size: int, name: str) -> int:
    """Number of x2 steps between 4x4 and `size`; `size` must be 4 * 2**k with k >= 1."""
    steps = (size // 4).bit_length() - 1
    if size < 8 or 4 * 2**steps != size:
        raise ValueError(f"{name}={size} must be a power of two >= 8 for the context encoder")
    return steps


def _width(base: int, doublings: int) -> int:
    return base * 2 ** min(max(doublings, 0), 3)


def _up(in_channels: int, out_channels: int, upsample: str) -> list[nn.Module]:
    """One x2 upsampling conv of the decoder, without normalisation or activation."""
    if upsample == "resize":
        return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)]
    return [nn.ConvTranspose2d(in_channels, out_channels, 4, 2, 1, bias=False)]


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN/Pathak initialisation: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _neighbour_sum(values: Tensor) -> Tensor:
    """Each pixel's sum of its 4 neighbours (up, left, right, down; 0 beyond the border): a 3x3 cross
    convolution with padding 1, the same values, as four shifted additions (oneDNN ran the
    convolution of [48, 1, 128, 128] single-channel maps at 21 ms on one thread; this takes 0.4 ms)."""
    padded = nn.functional.pad(values, (1, 1, 1, 1))
    return padded[..., :-2, 1:-1] + padded[..., 1:-1, :-2] + padded[..., 1:-1, 2:] + padded[..., 2:, 1:-1]


Window = tuple[int, int, int]
"""(top, left, size) of a square that holds every hole pixel."""


def seam_correction(filled: Tensor, masked: Tensor, mask: Tensor, radius: float,
                    window: Window | None = None) -> Tensor:
    """A smooth field inside the hole that removes the fill's mismatch with the context at the border.

    For each hole pixel p touching known pixels, the mismatch is the mean of its known 4-neighbours
    minus the fill at p. Every hole pixel gets the mismatches of all border pixels b averaged with
    weights 1 / (|p - b|^2 + radius^2) (Shepard interpolation): a step that runs along the border
    (the square seam) is removed, while detail finer than `radius` pixels averages out and stays.
    [B, 3, S, S] in, the correction (0 outside the hole) out, in `filled`'s dtype (computed in
    float32); differentiable in `filled`. With `window`, every hole pixel must lie inside it (the
    caller's promise, not checked: that would wait for the device): the weighted sums then run on
    the window alone, the same values at a fraction of the cost.
    """
    dtype = filled.dtype
    with torch.autocast(filled.device.type, enabled=False):  # float32 throughout, also under autocast
        correction = _shepard(filled.float(), masked.float(), mask, radius, window)
    return correction.to(dtype)


def _shepard(filled: Tensor, masked: Tensor, mask: Tensor, radius: float, window: Window | None) -> Tensor:
    """The float32 body of `seam_correction`.

    The weights depend on the offset p - b only, so both weighted sums are convolutions with one
    kernel, done by FFT on a 2N x 2N grid for an N x N area (offsets up to N - 1 never wrap around):
    the same numbers as a loop over border pixels, without data-dependent shapes or host syncs, so
    it compiles and keeps the step free of device-to-host waits. N is the image size, or the
    window's: the 64x64 centre hole of a 128x128 image needs a 128x128 grid instead of 256x256.
    """
    hole = mask[:, :1].float()
    known = 1.0 - hole
    count = _neighbour_sum(known)
    outside = _neighbour_sum(masked * known)
    border = hole * (count > 0).to(hole.dtype)
    mismatch = (outside / count.clamp(min=1.0) - filled) * border
    if window is not None:
        top, left, size = window
        crop = (..., slice(top, top + size), slice(left, left + size))
        around = (left, filled.shape[-1] - left - size, top, filled.shape[-2] - top - size)
        inside = _shepard_sums(mismatch[crop], border[crop], hole[crop], radius)
        return nn.functional.pad(inside, around)
    return _shepard_sums(mismatch, border, hole, radius)


def _shepard_sums(mismatch: Tensor, border: Tensor, hole: Tensor, radius: float) -> Tensor:
    """hole * (K * mismatch) / (K * border) on square maps, K the Shepard kernel, * by FFT."""
    size = mismatch.shape[-1]
    grid = 2 * size
    offset = torch.arange(grid, device=mismatch.device, dtype=mismatch.dtype)
    offset = torch.minimum(offset, grid - offset).square()
    kernel = torch.fft.rfft2(1.0 / (offset[:, None] + offset[None, :] + radius**2))

    def weighted_sum(values: Tensor) -> Tensor:
        spectrum = torch.fft.rfft2(values, s=(grid, grid)) * kernel
        return torch.fft.irfft2(spectrum, s=(grid, grid))[..., :size, :size]

    return hole * weighted_sum(mismatch) / weighted_sum(border).clamp(min=1e-6)


class ContextEncoder(nn.Module):
    """G: (masked image, mask) -> the composited image, equal to the input outside the hole.

    Our one deviation from Pathak: the input is the masked image concatenated with the mask
    (4 channels instead of 3), so the network knows where the hole is for non-centre masks.
    With `output_size == hole_size` (centre masks, Pathak's setting) the prediction is the hole
    only and is pasted into the centre of the canvas; with `output_size == image_size` (other mask
    kinds) it covers the whole image. Either way `forward` keeps the known pixels exactly.
    """

    def __init__(self, cfg: GeneratorConfig, image_size: int, hole_size: int,
                 output_size: int | None = None) -> None:
        super().__init__()
        self.image_size, self.hole_size = image_size, hole_size
        self.seam_blend = cfg.seam_blend
        self.output_size = hole_size if output_size is None else output_size
        if self.output_size not in (hole_size, image_size):
            raise ValueError(f"output_size={self.output_size} must be the hole size {hole_size} "
                             f"or the image size {image_size}")
        base = cfg.base_channels
        down, up = _steps_from_4(image_size, "image_size"), _steps_from_4(self.output_size, "output_size")

        layers: list[nn.Module] = [nn.Conv2d(4, base, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        for i in range(1, down):  # the first layer has no BatchNorm (DCGAN, Pathak)
            layers += [nn.Conv2d(_width(base, i - 2), _width(base, i - 1), 4, 2, 1, bias=False),
                       nn.BatchNorm2d(_width(base, i - 1)), nn.LeakyReLU(0.2, inplace=True)]
        layers += [WholeInputConv2d(_width(base, down - 2), cfg.bottleneck, 4),
                   nn.BatchNorm2d(cfg.bottleneck), nn.LeakyReLU(0.2, inplace=True)]
        self.encoder = nn.Sequential(*layers)

        top = _width(base, up - 1)
        layers = [WholeOutputConvTranspose2d(cfg.bottleneck, top, 4), nn.BatchNorm2d(top), nn.ReLU(True)]
        for i in range(up - 1, 0, -1):
            layers += [*_up(_width(base, i), _width(base, i - 1), cfg.upsample),
                       nn.BatchNorm2d(_width(base, i - 1)), nn.ReLU(True)]
        layers += [*_up(base, 3, cfg.upsample), nn.Tanh()]
        self.decoder = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)

    @property
    def hole_window(self) -> Window | None:
        """The centre square a hole-sized prediction covers: every hole this G fills lies in it
        (`hybridgan.inpaint` refuses other masks), so the seam blend works there; None for an
        image-sized prediction."""
        return None if self.output_size == self.image_size else center_box(self.image_size, self.hole_size)

    def predict(self, masked: Tensor, mask: Tensor) -> Tensor:
        """The raw prediction in [-1, 1]: [B, 3, output_size, output_size]."""
        return self.decoder(self.encoder(torch.cat([masked, mask.to(masked.dtype)], dim=1)))

    def to_canvas(self, prediction: Tensor) -> Tensor:
        """The prediction on an image-sized canvas: a hole-sized one pasted into the centre, zeros around."""
        window = self.hole_window
        if window is None:
            return prediction
        top, left, size = window
        return nn.functional.pad(prediction, (left, self.image_size - size - left, top, self.image_size - size - top))

    def forward(self, masked: Tensor, mask: Tensor) -> Tensor:
        """mask * prediction + (1 - mask) * masked: [B, 3, S, S], the known pixels kept exactly.

        With `seam_blend` > 0 the prediction is first corrected by `seam_correction` (then clamped
        to [-1, 1]), so that it meets the context without a step along the hole's border.
        """
        return self.compose(self.predict(masked, mask), masked, mask)

    def finish(self, last_layer_output: Tensor, masked: Tensor, mask: Tensor) -> Tensor:
        """The forward from the output of the decoder's last convolution on: its tanh, then
        `compose` (hybridgan.balance replays this on a copy of that layer, outside G's graph)."""
        return self.compose(self.decoder[-1](last_layer_output), masked, mask)

    def compose(self, prediction: Tensor, masked: Tensor, mask: Tensor) -> Tensor:
        """The prediction onto the canvas, the seam blend, and the known pixels around it."""
        canvas = self.to_canvas(prediction)
        if self.seam_blend > 0:
            correction = seam_correction(canvas, masked, mask, self.seam_blend, self.hole_window)
            canvas = (canvas + correction).clamp(-1.0, 1.0)
        return mask * canvas + (1 - mask) * masked


class GeneratorFill(nn.Module):
    """G's whole fill at its own size, as `hybridgan.inpaint` runs it: (image, mask) -> filled image.

    `image` is [N, 3, S, S] in [-1, 1] (S = `image_size`), `mask` [N, 1, S, S] with 1 in the hole and
    0 elsewhere. The hole's pixels are zeroed, G predicts, and `ContextEncoder.forward` composes
    (seam blend included): the result equals `image` exactly outside the hole. This module holds
    nothing but G, so `torch.export` of it runs without this package (`hybridgan.export --standalone`).
    """

    def __init__(self, generator: ContextEncoder) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, image: Tensor, mask: Tensor) -> Tensor:
        return self.generator(image * (1 - mask), mask)
