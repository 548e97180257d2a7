"""The generator, both discriminators, local ResNet50 weights and the model summary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torch import nn

from hybridgan.config import Config, DiscriminatorConfig, GeneratorConfig
from hybridgan.models.hybrid import UpBlock, memory_format_of
from hybridgan.models.layers import WholeInputConv2d, WholeOutputConvTranspose2d
from hybridgan.models import (
    ContextEncoder, DiscOutput, HybridDiscriminator, ModelWeightsError, PathakDiscriminator,
    build_discriminator, build_generator, model_summary,
)


def centre_mask(batch: int, size: int, hole: int) -> torch.Tensor:
    mask = torch.zeros(batch, 1, size, size)
    top = (size - hole) // 2
    mask[..., top:top + hole, top:top + hole] = 1.0
    return mask


def images(batch: int, size: int) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def small_config(size: int = 32, hole: int = 16, kind: str = "center") -> Config:
    cfg = Config()
    cfg.data.image_size, cfg.mask.hole_size, cfg.mask.kind = size, hole, kind
    cfg.generator = GeneratorConfig(base_channels=8, bottleneck=32)
    cfg.discriminator = DiscriminatorConfig(decoder_width=4, pathak_channels=8)
    return cfg


def assert_composited(out: torch.Tensor, masked: torch.Tensor, mask: torch.Tensor) -> None:
    assert out.shape == masked.shape and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    known = mask.expand_as(out) == 0
    assert torch.equal(out[known], masked[known])  # exact, not approximate
    assert not torch.equal(out[~known], masked[~known])  # the hole was filled


@pytest.mark.parametrize("size,hole,base,bottleneck", [(32, 16, 8, 32), (128, 64, 16, 64)])
def test_generator_centre_composite(size: int, hole: int, base: int, bottleneck: int) -> None:
    g = ContextEncoder(GeneratorConfig(base_channels=base, bottleneck=bottleneck), size, hole)
    x, mask = images(2, size), centre_mask(2, size, hole)
    masked = x * (1 - mask)
    assert g.predict(masked, mask).shape == (2, 3, hole, hole)
    assert_composited(g(masked, mask), masked, mask)


def test_generator_full_output_for_other_masks() -> None:
    g = build_generator(small_config(64, 32, kind="random_box"))
    assert g.output_size == 64
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, 3:40, 10:30] = 1
    mask[1, :, 30:60, 2:50] = 1
    masked = images(2, 64) * (1 - mask)
    assert g.predict(masked, mask).shape == (2, 3, 64, 64)
    assert_composited(g(masked, mask), masked, mask)


def test_build_generator_centre_predicts_the_hole() -> None:
    assert build_generator(small_config(64, 32)).output_size == 32


def test_paper_generator_is_pathaks_size() -> None:
    with torch.device("meta"):
        g = ContextEncoder(GeneratorConfig(base_channels=64, bottleneck=4000), 128, 64)
    # Pathak's 71.1 M with 3 input channels, + 64*16 weights for our mask channel
    assert sum(p.numel() for p in g.parameters()) == 71_125_568


def test_generator_rejects_sizes_it_cannot_reach() -> None:
    with pytest.raises(ValueError, match="hole_size|output_size=24"):
        ContextEncoder(GeneratorConfig(8, 16), 64, 24)


@pytest.mark.parametrize("size,width", [(128, 4), (64, 8)])
def test_hybrid_shapes_and_ranges(size: int, width: int) -> None:
    d = HybridDiscriminator(DiscriminatorConfig(decoder_width=width), size)
    out = d(images(2, size))
    assert isinstance(out, DiscOutput)
    assert out.global_prob.shape == (2,) and out.pixel_prob.shape == (2, 1, size, size)
    for score, prob in zip(out, (out.global_prob, out.pixel_prob)):
        assert score.dtype == torch.float32 and torch.isfinite(score).all()
        assert torch.equal(prob, score.sigmoid()) and 0 <= prob.min() and prob.max() <= 1


def test_hybrid_outputs_float32_under_bf16_autocast() -> None:
    d = HybridDiscriminator(DiscriminatorConfig(decoder_width=4), 32).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = d(images(1, 32))
    for score, prob in zip(out, (out.global_prob, out.pixel_prob)):
        assert score.dtype == torch.float32 and torch.isfinite(score).all()
        assert torch.equal(prob, score.sigmoid()) and 0 <= prob.min() and prob.max() <= 1


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_up_block_concatenates_in_the_convolutions_dtype_and_layout(memory_format) -> None:
    """The skip is cast and laid out like the up-sampled tensor before the cat: the same values as
    autocast's cast of a float32 cat, in the layout the convolution runs in."""
    block = UpBlock(8, 3, 4).eval().to(memory_format=memory_format)
    low = torch.randn(2, 8, 16, 16).to(torch.bfloat16).contiguous(memory_format=memory_format)  # as in D
    skip = images(2, 32)  # float32, channels-first: the normalised image of the last block
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        up = F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
        expected = block.conv(torch.cat([up.float(), skip], dim=1))
        out = block(low, skip)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    assert out.is_contiguous(memory_format=memory_format)
    assert memory_format_of(low) == memory_format


def test_hybrid_without_full_resolution_block_upsamples_the_pixel_logits() -> None:
    full = HybridDiscriminator(DiscriminatorConfig(decoder_width=4), 64)
    lean = HybridDiscriminator(DiscriminatorConfig(decoder_width=4, full_resolution_block=False), 64)
    assert len(lean.decoder) == len(full.decoder) - 1 == 4 and lean.pixel_head.in_channels == 8
    lean.eval()
    x = images(2, 64)
    with torch.no_grad():
        out = lean(x)
        stem, f1, f2, f3, d = _encoder_features(lean, x)
        for block, skip in zip(lean.decoder, (f3, f2, f1, stem)):
            d = block(d, skip)
        assert d.shape[-1] == 32
        logits = F.interpolate(lean.pixel_head(d), size=(64, 64), mode="bilinear", align_corners=False)
    assert out.pixel_prob.shape == (2, 1, 64, 64)
    assert torch.allclose(out.pixel_prob, logits.sigmoid(), atol=1e-6)
    assert model_summary(lean, x[:1])["flops"] < model_summary(full, x[:1])["flops"]


def _encoder_features(d: HybridDiscriminator, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """stem, layer1..layer4 of the hybrid D's encoder for `image`."""
    e = d.encoder
    x = ((image + 1) / 2 - d.mean) / d.std
    stem = e.relu(e.bn1(e.conv1(x)))
    f1 = e.layer1(e.maxpool(stem))
    f2 = e.layer2(f1)
    f3 = e.layer3(f2)
    return stem, f1, f2, f3, e.layer4(f3)


def test_zero_init_residual_starts_every_bottleneck_as_the_identity() -> None:
    plain = HybridDiscriminator(DiscriminatorConfig(), 64).encoder
    zeroed = HybridDiscriminator(DiscriminatorConfig(zero_init_residual=True), 64).encoder
    blocks = [block for layer in (zeroed.layer1, zeroed.layer2, zeroed.layer3, zeroed.layer4) for block in layer]
    assert len(blocks) == 16 and all(float(block.bn3.weight.abs().max()) == 0.0 for block in blocks)
    assert float(plain.layer1[0].bn3.weight.abs().min()) == 1.0


def test_hybrid_rejects_size_not_divisible_by_32() -> None:
    with pytest.raises(ValueError, match="image_size=48"):
        HybridDiscriminator(DiscriminatorConfig(decoder_width=4), 48)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_resnet_weights_round_trip(tmp_path, suffix: str) -> None:
    torch.manual_seed(1)
    state = torchvision.models.resnet50(weights=None).state_dict()  # includes fc.*, as torchvision's files do
    path = tmp_path / f"resnet50{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    d = HybridDiscriminator(DiscriminatorConfig(decoder_width=4, resnet_weights=str(path)), 32)
    loaded = d.encoder.state_dict()
    assert loaded.keys() == {k for k in state if not k.startswith("fc.")}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def _garbage(path):
    path.write_bytes(b"definitely not a weights file")


def _resnet18(path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)


def _wrong_shape(path):
    state = torchvision.models.resnet50(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    torch.save(state, path)


@pytest.mark.parametrize("write,reason", [
    (None, "not found"), (_garbage, "not a readable"), (_resnet18, "not resnet50"), (_wrong_shape, "conv1.weight"),
])
def test_bad_resnet_weights_name_the_file(tmp_path, write, reason: str) -> None:
    path = tmp_path / "weights.pth"
    if write is not None:
        write(path)
    with pytest.raises(ModelWeightsError) as info:
        HybridDiscriminator(DiscriminatorConfig(decoder_width=4, resnet_weights=str(path)), 32)
    message = str(info.value)
    assert str(path) in message and reason in message and "\n" not in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("size", [32, 128])
def test_pathak_discriminator(size: int) -> None:
    d = build_discriminator(small_config(size, size // 2), "pathak")
    assert isinstance(d, PathakDiscriminator)
    out = d(images(2, size))
    assert out.pixel_prob is None and out.global_prob.shape == (2,)
    assert out.global_prob.dtype == torch.float32 and 0 <= out.global_prob.min() and out.global_prob.max() <= 1


def test_build_discriminator_kind_from_config() -> None:
    cfg = small_config()
    assert isinstance(build_discriminator(cfg), HybridDiscriminator)
    cfg.discriminator.kind = "pathak"
    assert isinstance(build_discriminator(cfg), PathakDiscriminator)
    with pytest.raises(ValueError, match="'nope'"):
        build_discriminator(cfg, "nope")


def test_model_summary_counts_params_and_flops() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    info = model_summary(conv, torch.zeros(2, 3, 8, 8), name="conv")
    assert info["params"] == 8 * 3 * 9
    assert info["flops"] == 2 * 2 * (8 * 8) * 8 * 3 * 9  # 2 FLOPs per multiply-add, batch 2
    assert info["flops_per_image"] == info["flops"] / 2
    assert info["text"] == "conv: 0.0 M params, 0.00 GFLOP/img at 8x8"
    assert conv.training  # mode restored


def test_model_summary_of_generator_at_batch_1() -> None:
    g = build_generator(small_config())
    mask = centre_mask(1, 32, 16)
    info = model_summary(g, images(1, 32) * (1 - mask), mask, name="generator")
    assert info["params"] == sum(p.numel() for p in g.parameters()) and info["flops"] > 0
    assert info["text"].startswith("generator: ") and info["text"].endswith("at 32x32")


def test_bottleneck_products_follow_autocast_like_linear_layers():
    """Under bf16 autocast G's bottleneck products run in bf16 (the same values as `nn.Linear` with
    the same weights under autocast), close to float32's, and its weights get float32 gradients."""
    torch.manual_seed(0)
    encode, decode = WholeInputConv2d(8, 12, 4), WholeOutputConvTranspose2d(12, 8, 4)
    linear = torch.nn.Linear(8 * 16, 12, bias=False)
    linear.weight.data = encode.weight.detach().reshape(12, -1)
    x = torch.randn(2, 8, 4, 4)
    plain = decode(encode(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encoded = encode(x)
        mixed = decode(encoded)
        assert torch.equal(encoded.flatten(1), linear(x.flatten(1)))
    assert encoded.dtype == mixed.dtype == torch.bfloat16
    assert torch.allclose(mixed.float(), plain, atol=0.05)
    mixed.float().sum().backward()
    assert encode.weight.grad.dtype == decode.weight.grad.dtype == torch.float32
    assert encode.weight.grad.abs().sum() > 0 and decode.weight.grad.abs().sum() > 0


def test_neighbour_sum_equals_the_cross_convolution_of_the_seam_blend():
    """The seam blend's 4-neighbour sums: the same values as a 3x3 cross convolution with padding 1."""
    from hybridgan.models.generator import _neighbour_sum

    torch.manual_seed(0)
    values = torch.randn(4, 3, 17, 16)
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    expected = F.conv2d(values.flatten(0, 1)[:, None], cross, padding=1).view_as(values)
    assert torch.equal(_neighbour_sum(values), expected)
    assert _neighbour_sum(values)[0, 0, 0, 0] == values[0, 0, 0, 1] + values[0, 0, 1, 0]  # a corner: 2 neighbours


def test_seam_correction_in_a_window_holding_the_hole_equals_the_whole_frame():
    """The seam blend on the window alone: the same correction and gradient as on the whole frame,
    for a ragged hole inside the window touching its edges; a hole-sized G blends in its centre square."""
    from hybridgan.models.generator import seam_correction

    torch.manual_seed(0)
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 8:24, 8:24] = (torch.rand(2, 1, 16, 16) > 0.3).float()
    mask[..., 8, 8:24] = mask[..., 8:24, 23] = 1.0  # the window's top and right edges
    masked = images(2, 32) * (1 - mask)
    corrections, gradients = [], []
    for window in (None, (8, 8, 16)):
        filled = (masked + mask * images(2, 32)).requires_grad_()
        correction = seam_correction(filled, masked, mask, 3.0, window)
        (correction * torch.linspace(-1, 1, 32)).sum().backward()
        corrections.append(correction.detach())
        gradients.append(filled.grad)
    assert corrections[0].abs().max() > 0.1
    torch.testing.assert_close(corrections[1], corrections[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(gradients[1], gradients[0], atol=1e-5, rtol=0)
    assert torch.equal(corrections[1] * (1 - mask), torch.zeros_like(masked))
    config = GeneratorConfig(base_channels=8, bottleneck=16, seam_blend=3.0)
    assert ContextEncoder(config, 32, 16).hole_window == (8, 8, 16)
    assert ContextEncoder(config, 32, 16, output_size=32).hole_window is None


def test_border_weights_square_maximum_equals_max_pool_over_the_square():
    """`border_weights` takes the band's square maximum as two one-dimensional ones: the same weights."""
    from hybridgan.losses import border_weights

    torch.manual_seed(0)
    mask = (torch.rand(3, 1, 40, 40) > 0.4).float()
    near_known = F.max_pool2d(1 - mask, 9, stride=1, padding=4)
    assert torch.equal(border_weights(mask, band=4, weight=10.0), mask * (1 + 9 * near_known))
