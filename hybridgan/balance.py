"""How much the adversarial term weighs in G's step: beta of eq. 3, fixed or found at every step.

The paper says alpha, beta, gamma and epsilon "are obtained during training to obtain the optimal
value". `loss.beta_mode=adaptive` reads that as VQGAN's adaptive weight (taming-transformers,
`calculate_adaptive_weight`): at every step, beta is set so that the adversarial gradient at G's last
layer is `loss.adaptive_scale` times the (alpha-weighted) pixel gradient there,

    beta = adaptive_scale * alpha * ||dL_pixel/dW_last|| / (||dL_adv/dW_last|| + 1e-8),

clamped to [`loss.beta_min`, `loss.beta_max`] and treated as a constant (no gradient flows through
it). `loss.beta_mode=fixed` uses `loss.beta`. In both modes beta ramps linearly from 0 over the first
`loss.adversarial_warmup` steps (D learns from the first step, so it is not random when G starts
listening to it).

The G step takes the two terms' gradients at G's output `fake` (the pixel term's is elementwise, the
adversarial one's is D's backward, which the step needs anyway), mixes them with alpha and beta, and
pushes the mix through G once as the gradient of `(fake * mixed).sum()`: the same gradient as the
joint loss's, with the norms measured on the way. The norms at G's output are logged too (the
adversarial one is what shows a dead term in TensorBoard: a saturated D gives ~0).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from hybridgan.config import LossConfig

_EPS = 1e-8


class MixedGradient(NamedTuple):
    """What G's step back-propagates and what it logs."""

    surrogate: Tensor  # (fake * mixed gradient).sum(): its gradient for G is the joint loss's
    joint: Tensor  # alpha * L_pixel + beta * L_adv with the beta used, for the log (gen_loss)
    beta: Tensor  # the beta used at this step
    pixel_grad_norm: Tensor  # ||alpha dL_pixel / d fake||
    adv_grad_norm: Tensor  # ||dL_adv / d fake||, before beta
    grad_ratio: Tensor  # ||beta dL_adv/dW_last|| / ||alpha dL_pixel/dW_last||: adaptive_scale unless clamped


def last_layer_weight(gen: nn.Module) -> Tensor:
    """The weight of G's last layer with one (its final up-convolution or convolution)."""
    weights = [m.weight for m in gen.modules() if isinstance(getattr(m, "weight", None), Tensor)
               and m.weight.requires_grad]
    if not weights:
        raise ValueError("the generator has no trainable layer weight")
    return weights[-1]


def warmup_factor(cfg: LossConfig, step: int) -> float:
    """Beta's ramp at 0-based `step`: linear over `adversarial_warmup` steps, 1 after (and when 0)."""
    if cfg.adversarial_warmup <= 0:
        return 1.0
    return min(1.0, step / cfg.adversarial_warmup)


def adaptive_beta(cfg: LossConfig, pixel_weight_grad_norm: Tensor, adv_weight_grad_norm: Tensor) -> Tensor:
    """VQGAN's adaptive weight, clamped to the config's bounds (before the warm-up ramp)."""
    beta = cfg.adaptive_scale * pixel_weight_grad_norm / (adv_weight_grad_norm + _EPS)
    return beta.clamp(cfg.beta_min, cfg.beta_max).detach()


def mix_gradients(fake: Tensor, weighted_pixel: Tensor, adv: Tensor, cfg: LossConfig, step: int,
                  last_weight: Tensor) -> MixedGradient:
    """The G step's gradient at `fake` as alpha dL_pixel + beta dL_adv (see the module docstring).

    `weighted_pixel` is alpha * L_pixel; `adv` is L_adv, both with graphs through `fake`.
    """
    g_pixel, = torch.autograd.grad(weighted_pixel, fake, retain_graph=True)
    g_adv, = torch.autograd.grad(adv, fake, retain_graph=True)
    w_pixel, = torch.autograd.grad(fake, last_weight, grad_outputs=g_pixel, retain_graph=True)
    w_adv, = torch.autograd.grad(fake, last_weight, grad_outputs=g_adv, retain_graph=True)
    pixel_norm, adv_norm = w_pixel.float().norm(), w_adv.float().norm()
    if cfg.beta_mode == "adaptive":
        beta = adaptive_beta(cfg, pixel_norm, adv_norm)
    else:
        beta = torch.tensor(cfg.beta, device=fake.device)
    beta = beta * warmup_factor(cfg, step)
    mixed = (g_pixel.float() + beta * g_adv.float()).to(fake.dtype)
    return MixedGradient(
        surrogate=(fake * mixed).sum(),
        joint=(weighted_pixel + beta * adv).detach(),
        beta=beta.detach(),
        pixel_grad_norm=g_pixel.float().norm(),
        adv_grad_norm=g_adv.float().norm(),
        grad_ratio=(beta * adv_norm / (pixel_norm + _EPS)).detach(),
    )
