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

The G step takes the two terms' gradients at a detached copy of G's output (the pixel term's is
elementwise, the adversarial one's is D's backward, which the step needs anyway), reads their norms
at G's last layer on a replica of G's tail (`LastLayer`), mixes them with alpha and beta, and pushes
the mix through G once as the gradient of `(fake * mixed).sum()`: the same gradient as the joint
loss's, with one backward through G, as before, and nothing outside it touching G's graph. The norms
at G's output are logged too (the adversarial one is what shows a dead term in TensorBoard: a
saturated D gives ~0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from hybridgan.config import LossConfig
from hybridgan.models import ContextEncoder

_EPS = 1e-8


class MixedGradient(NamedTuple):
    """What G's step back-propagates and what it logs."""

    gradient: Tensor  # alpha dL_pixel/dfake + beta dL_adv/dfake: G back-propagates (fake * gradient).sum()
    joint: Tensor  # alpha * L_pixel + beta * L_adv with the beta used, for the log (gen_loss)
    beta: Tensor  # the beta used at this step
    pixel_grad_norm: Tensor  # ||alpha dL_pixel / d fake||
    adv_grad_norm: Tensor  # ||dL_adv / d fake||, before beta
    grad_ratio: Tensor  # ||beta dL_adv/dW_last|| / ||alpha dL_pixel/dW_last||: adaptive_scale unless clamped


class LastLayer:
    """G's last convolution (`decoder[-2]`, before the tanh), watched: its input of the latest
    forward, from which `weight_grad` replays G's tail on a detached copy of the layer's weight.

    Never through G's own graph or parameters: a DeepSpeed engine reduces gradients from hooks that
    any backward through its module or its output fires, outside the engine's own backward.
    """

    def __init__(self, gen: ContextEncoder) -> None:
        self.gen = gen
        self.module = gen.decoder[-2]
        if not isinstance(getattr(self.module, "weight", None), Tensor):
            raise ValueError(f"the generator's last decoder layer {type(self.module).__name__} has no weight")
        self._input: Tensor | None = None
        self._replaying = False
        self.module.register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, args: tuple[Tensor, ...], _output: Tensor) -> None:
        if not self._replaying:  # the replica's forward in `weight_grad` is not G's
            self._input = args[0]

    def weight_grad(self, grad_at_fake: Tensor, masked: Tensor, mask: Tensor) -> Tensor:
        """The gradient at the layer's weight of a loss whose gradient at G's output is
        `grad_at_fake`, for the latest forward on (`masked`, `mask`)."""
        if self._input is None:
            raise RuntimeError("the generator's last layer has not run a forward yet")
        layer_in = self._input.detach()
        params = {name: p.detach().to(layer_in.dtype).requires_grad_(name == "weight")
                  for name, p in self.module.named_parameters(recurse=False)}
        self._replaying = True
        try:
            with torch.enable_grad():
                replica = self.gen.finish(torch.func.functional_call(self.module, params, (layer_in,)), masked, mask)
        finally:
            self._replaying = False
        grad_weight, = torch.autograd.grad(replica, params["weight"], grad_outputs=grad_at_fake.to(replica.dtype))
        return grad_weight


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
                  weight_grad: Callable[[Tensor], Tensor]) -> MixedGradient:
    """The G step's gradient at G's output as alpha dL_pixel + beta dL_adv (module docstring).

    `fake` is a detached copy of G's output that requires grad; `weighted_pixel` (alpha * L_pixel)
    and `adv` (L_adv) are computed from it, so that nothing here reaches G's graph. `weight_grad`
    maps a gradient at G's output to the one at G's last layer (`LastLayer.weight_grad`).
    """
    g_pixel, = torch.autograd.grad(weighted_pixel, fake, retain_graph=True)
    g_adv, = torch.autograd.grad(adv, fake)
    pixel_norm, adv_norm = weight_grad(g_pixel).float().norm(), weight_grad(g_adv).float().norm()
    if cfg.beta_mode == "adaptive":
        beta = adaptive_beta(cfg, pixel_norm, adv_norm)
    else:
        beta = torch.tensor(cfg.beta, device=fake.device)
    beta = beta * warmup_factor(cfg, step)
    return MixedGradient(
        gradient=(g_pixel.float() + beta * g_adv.float()).detach(),
        joint=(weighted_pixel + beta * adv).detach(),
        beta=beta.detach(),
        pixel_grad_norm=g_pixel.float().norm(),
        adv_grad_norm=g_adv.float().norm(),
        grad_ratio=(beta * adv_norm / (pixel_norm + _EPS)).detach(),
    )
