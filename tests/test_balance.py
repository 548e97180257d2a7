"""The G step's beta: the mixed gradient equals the joint loss's, the adaptive beta, the warm-up."""

from __future__ import annotations

import pytest
import torch

from hybridgan.balance import LastLayer, mix_gradients, warmup_factor
from hybridgan.config import DiscriminatorConfig, GeneratorConfig, LossConfig
from hybridgan.losses import adversarial_loss, trained_pixel_loss
from hybridgan.models import ContextEncoder, PathakDiscriminator


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    gen = ContextEncoder(GeneratorConfig(base_channels=8, bottleneck=16), 32, 16)
    disc = PathakDiscriminator(DiscriminatorConfig(pathak_channels=8), 32, 16)
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    mask = torch.zeros(4, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    return gen, disc, real, mask


def _terms(gen, disc, real, mask, cfg):
    """G's output, and the two terms computed on a detached copy of it, as the G step does."""
    fake = gen(real * (1 - mask), mask)
    judged = fake.detach().requires_grad_(True)
    return fake, judged, cfg.alpha * trained_pixel_loss(real, judged, cfg, mask), adversarial_loss(disc(judged), cfg)


def _grads(gen) -> list[torch.Tensor]:
    return [p.grad.clone() for p in gen.parameters()]


def _weight_grad(last: LastLayer, real, mask):
    return lambda grad: last.weight_grad(grad, real * (1 - mask), mask)


@pytest.mark.parametrize("objective", ["lsgan", "sigmoid_l2"])
def test_the_mixed_gradient_is_the_joint_losss_gradient(objective: str) -> None:
    cfg = LossConfig(alpha=0.9, beta=0.3, adversarial=objective)
    gen, disc, real, mask = _setup()
    last = LastLayer(gen)
    fake = gen(real * (1 - mask), mask)
    (cfg.alpha * trained_pixel_loss(real, fake, cfg, mask) + cfg.beta * adversarial_loss(disc(fake), cfg)).backward()
    expected = _grads(gen)
    gen.zero_grad()
    fake, judged, pixel, adv = _terms(gen, disc, real, mask, cfg)
    mixed = mix_gradients(judged, pixel, adv, cfg, 10, _weight_grad(last, real, mask))
    (fake * mixed.gradient).sum().backward()
    for got, want in zip(_grads(gen), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert mixed.beta.item() == pytest.approx(0.3)
    assert mixed.joint.item() == pytest.approx((pixel + 0.3 * adv).item(), rel=1e-6)


def test_adaptive_beta_sets_the_gradient_ratio_at_the_last_layer_and_is_clamped() -> None:
    gen, disc, real, mask = _setup()
    last = LastLayer(gen)
    cfg = LossConfig(alpha=1.0, beta_mode="adaptive", adaptive_scale=0.25, beta_max=1e6, adversarial="lsgan")
    fake = gen(real * (1 - mask), mask)
    weight = last.module.weight
    w_pixel, = torch.autograd.grad(trained_pixel_loss(real, fake, cfg, mask), weight, retain_graph=True)
    w_adv, = torch.autograd.grad(adversarial_loss(disc(fake), cfg), weight)
    fake, judged, pixel, adv = _terms(gen, disc, real, mask, cfg)
    mixed = mix_gradients(judged, pixel, adv, cfg, 0, _weight_grad(last, real, mask))
    assert mixed.beta.item() == pytest.approx(0.25 * (w_pixel.norm() / w_adv.norm()).item(), rel=1e-4)
    assert mixed.grad_ratio.item() == pytest.approx(0.25, rel=1e-4)
    assert mixed.adv_grad_norm.item() > 0 and mixed.pixel_grad_norm.item() > 0
    assert weight.grad is None  # nothing reached G's parameters (DeepSpeed reduces from hooks on them)
    capped = LossConfig(alpha=1.0, beta_mode="adaptive", adaptive_scale=0.25, beta_max=1e-9, adversarial="lsgan")
    fake, judged, pixel, adv = _terms(gen, disc, real, mask, capped)
    assert mix_gradients(judged, pixel, adv, capped, 0, _weight_grad(last, real, mask)).beta.item() == pytest.approx(1e-9)


def test_beta_warms_up_linearly_from_zero() -> None:
    cfg = LossConfig(adversarial_warmup=4)
    assert [warmup_factor(cfg, s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_factor(LossConfig(), 0) == 1.0
    gen, disc, real, mask = _setup()
    last = LastLayer(gen)
    fixed = LossConfig(beta=0.5, adversarial_warmup=4)
    fake, judged, pixel, adv = _terms(gen, disc, real, mask, fixed)
    assert mix_gradients(judged, pixel, adv, fixed, 2, _weight_grad(last, real, mask)).beta.item() == pytest.approx(0.25)


def test_the_last_layer_is_gs_output_convolution() -> None:
    gen, *_ = _setup()
    last = LastLayer(gen)
    assert isinstance(last.module, torch.nn.ConvTranspose2d) and last.module.weight.shape[1] == 3  # to RGB
    assert isinstance(gen.decoder[-1], torch.nn.Tanh)  # what `finish` replays after it
