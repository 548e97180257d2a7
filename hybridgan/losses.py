"""The paper's losses, eq. 1-6 (§2.2.3 of the paper; docs/paper.md), one function per equation.

The paper writes every loss as ||target - x||_2^2; we take the MEAN of the squared error, not the
sum: the paper's Table 2 values (gen_pixel_loss 0.19, gen_adv_loss 0.999 for a D that is sure every
fake is fake) only make sense as means. A discriminator output is a `DiscOutput` of raw scores; for
the hybrid D both its outputs enter each loss, `cfg.global_weight * L(global) + cfg.pixel_weight *
L(pixel)`; for Pathak's D (`pixel_score is None`) the global term alone, with weight 1.

What "x" in eq. 2, 4 and 5 is, and so how a score is compared with its 0/1 target, is the
adversarial objective (`loss.adversarial`; docs/quality.md measures them):
- `lsgan`: (score - target)^2 on the raw score: eq. 2/4/5 read literally, Mao et al.'s LSGAN. Its
  gradient grows with the distance to the target, so it never saturates.
- `sigmoid_l2`: (sigmoid(score) - target)^2, the L2 of a probability. Its gradient,
  -2 p (1 - p)^2 for a real target, vanishes once D is sure: a dead adversarial term.
- `bce`: binary cross-entropy of the logit; G's side is the non-saturating -log D(G(z)).
- `hinge`: D minimises relu(1 - s) on real and relu(1 + s) on fake targets, G minimises -s.
Everything is computed in float32, also under autocast.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from hybridgan.config import LossConfig
from hybridgan.models import DiscOutput

OBJECTIVES = ("lsgan", "sigmoid_l2", "bce", "hinge")


class GeneratorLosses(NamedTuple):
    joint: Tensor  # eq. 3, what G minimises; logged as gen_loss
    pixel: Tensor  # eq. 1, gen_pixel_loss in Table 2
    adv: Tensor  # eq. 2, gen_adv_loss in Table 2


class DiscriminatorLosses(NamedTuple):
    joint: Tensor  # eq. 6, what D minimises; disc_loss in Table 2
    real: Tensor  # eq. 4
    fake: Tensor  # eq. 5


def score_loss(score: Tensor, target: Tensor | float, objective: str, generator: bool = False,
               weight: Tensor | None = None) -> Tensor:
    """Mean loss of raw scores against targets (1 real, 0 fake; a tensor broadcast to `score`),
    weighted by `weight` (same shape; a weighted mean) when given.

    `generator=True` is G's side, whose target is always "real": the same term for lsgan,
    sigmoid_l2 and bce (non-saturating), -score for hinge.
    """
    score = score.float()
    target = target.float().expand_as(score) if isinstance(target, Tensor) else score.new_full(score.shape, target)
    if objective == "lsgan":
        loss = (score - target).square()
    elif objective == "sigmoid_l2":
        loss = (score.sigmoid() - target).square()
    elif objective == "bce":
        loss = F.binary_cross_entropy_with_logits(score, target, reduction="none")
    elif objective == "hinge":
        loss = -score if generator else target * F.relu(1.0 - score) + (1.0 - target) * F.relu(1.0 + score)
    else:
        raise ValueError(f"adversarial objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp_min(1e-12)


def balanced_weights(target: Tensor) -> Tensor:
    """Per-pixel weights under which the pixels with target < 0.5 (blurred) and the others weigh
    half of the batch's term each, however few the blurred pixels are (8 % of a blurred face)."""
    blurred = (target < 0.5).float()
    count = blurred.sum().clamp_min(1.0)
    rest = (1.0 - blurred).sum().clamp_min(1.0)
    return blurred / count + (1.0 - blurred) / rest


def _weighted(d_out: DiscOutput, cfg: LossConfig, global_target: Tensor | float, pixel_target: Tensor | float,
              objective: str, generator: bool = False, pixel_weight: Tensor | None = None) -> Tensor:
    """The objective's loss of both outputs against their targets, mixed by the config's weights
    (the per-pixel term weighted by `pixel_weight` when given)."""
    global_term = score_loss(d_out.global_score, global_target, objective, generator)
    if d_out.pixel_score is None:
        return global_term
    pixel_term = score_loss(d_out.pixel_score, pixel_target, objective, generator, pixel_weight)
    return cfg.global_weight * global_term + cfg.pixel_weight * pixel_term


def d_output(scores: Tensor, objective: str) -> Tensor:
    """D's output in the units its targets are in: the probability sigmoid(score) under sigmoid_l2
    and bce, the raw score under lsgan and hinge (logged as d_real, d_fake)."""
    return scores.float().sigmoid() if objective in ("sigmoid_l2", "bce") else scores.float()


def decided_real(d_out: DiscOutput, objective: str) -> Tensor:
    """Per image, whether D's global score says "real": above the midpoint of its two targets
    (0.5 for lsgan, 0 for the logit objectives and hinge)."""
    threshold = 0.5 if objective == "lsgan" else 0.0
    return d_out.global_score.float() > threshold


def pixel_loss(real: Tensor, fake: Tensor, mask: Tensor | None = None) -> Tensor:
    """Eq. 1, L_pixel = ||Img - G(Mask_Img)||_2^2, as a mean squared error.

    With `mask` [B, 1, S, S] (1 = hole), the mean over the hole's pixels (and the 3 channels), as in
    Pathak's code; the training loop passes the hole mask. Without it, the mean over the whole image.
    Since the composited G(Mask_Img) equals Img outside the hole, the whole-image mean is the hole
    mean times the hole's area fraction (0.25 for the paper's 64x64 hole in 128x128).
    """
    error = (real.float() - fake.float()).square()
    if mask is None:
        return error.mean()
    weight = mask.float().expand_as(error)
    return (error * weight).sum() / weight.sum().clamp_min(1.0)


def border_weights(mask: Tensor, band: int, weight: float) -> Tensor:
    """Per-pixel L2 weights: 0 outside the hole, `weight` within `band` pixels of its border, 1 deeper.

    Pathak's overlap-weighted L2: his generator predicts the hole plus a 4-pixel overlap with the
    context and weighs the squared error there 10x, so the prediction must agree with the known
    pixels around it. Our centre generator predicts the hole only, so the band lies just inside the
    hole's border: the pixels that meet the context. The image edge is not a border.
    """
    hole = mask.float()
    if band <= 0:
        return hole
    known = 1.0 - hole
    # the (2 band + 1)^2 square's maximum as a row maximum of column maxima: the same values, and
    # 11 -> 4 ms at batch 16, 128x128, band 4, one thread
    near_known = F.max_pool2d(known, (1, 2 * band + 1), stride=1, padding=(0, band))
    near_known = F.max_pool2d(near_known, (2 * band + 1, 1), stride=1, padding=(band, 0))
    return hole * (1.0 + (weight - 1.0) * near_known)


def weighted_pixel_loss(real: Tensor, fake: Tensor, weights: Tensor) -> Tensor:
    """The squared error's mean over the hole weighted by `weights` (sum(w * e) / sum(w), all channels).

    Dividing by the weights' sum keeps the term's scale, so alpha and beta keep their balance.
    """
    error = (real.float() - fake.float()).square()
    weights = weights.float().expand_as(error)
    return (error * weights).sum() / weights.sum().clamp_min(1e-12)


def adversarial_loss(d_fake: DiscOutput, cfg: LossConfig, hole_mask: Tensor | None = None) -> Tensor:
    """Eq. 2, L_adv = ||Ones - D(G(Mask_Img))||_2^2 under `cfg.adversarial`: G wants D to call its
    images real everywhere.

    The target is all ones for both outputs, so `hole_mask` does not change it; it is accepted so
    that the generator and discriminator losses take the same arguments.
    """
    return _weighted(d_fake, cfg, 1.0, 1.0, cfg.adversarial, generator=True)


def trained_pixel_loss(real: Tensor, fake: Tensor, cfg: LossConfig, hole_mask: Tensor | None = None) -> Tensor:
    """The L_pixel that G minimises: the border-weighted hole mean (`border_weights`) with
    `cfg.overlap` > 0 and a hole mask, else `pixel_loss`."""
    if hole_mask is not None and cfg.overlap > 0:
        return weighted_pixel_loss(real, fake, border_weights(hole_mask, cfg.overlap, cfg.overlap_weight))
    return pixel_loss(real, fake, hole_mask)


def generator_joint_loss(real: Tensor, fake: Tensor, d_fake: DiscOutput, cfg: LossConfig,
                         hole_mask: Tensor | None = None) -> GeneratorLosses:
    """Eq. 3, L_gen_joint = alpha * L_pixel + beta * L_adv (L_pixel over the hole when given), with
    the fixed `cfg.beta` (the adaptive beta is `hybridgan.balance`'s).

    The L_pixel inside the joint loss is `trained_pixel_loss`; `pixel` stays the plain hole mean, so
    Table 2's gen_pixel_loss keeps its meaning whatever the weighting.
    """
    pixel = pixel_loss(real, fake, hole_mask)
    adv = adversarial_loss(d_fake, cfg, hole_mask)
    trained = trained_pixel_loss(real, fake, cfg, hole_mask)
    return GeneratorLosses(cfg.alpha * trained + cfg.beta * adv, pixel, adv)


def real_loss(d_real: DiscOutput, cfg: LossConfig) -> Tensor:
    """Eq. 4, L_real = ||Ones - D(Img)||_2^2: a real image is real as a whole and at every pixel."""
    return _weighted(d_real, cfg, 1.0, 1.0, cfg.adversarial)


def fake_loss(d_fake: DiscOutput, cfg: LossConfig, hole_mask: Tensor) -> Tensor:
    """Eq. 5, L_fake = ||Zeros - D(G(Mask_Img))||_2^2.

    The global target is 0. A composited fake is only fake inside the hole, so the per-pixel
    target is 0 inside the hole and 1 outside, `1 - hole_mask` (docs/paper.md).
    """
    return _weighted(d_fake, cfg, 0.0, 1.0 - hole_mask.float(), cfg.adversarial)


def discriminator_joint_loss(d_real: DiscOutput, d_fake: DiscOutput, cfg: LossConfig,
                             hole_mask: Tensor) -> DiscriminatorLosses:
    """Eq. 6, L_disc_joint = gamma * L_real + epsilon * L_fake."""
    real, fake = real_loss(d_real, cfg), fake_loss(d_fake, cfg, hole_mask)
    return DiscriminatorLosses(cfg.gamma * real + cfg.epsilon * fake, real, fake)


def blur_discriminator_loss(d_out: DiscOutput, is_real_global: Tensor, pixel_target: Tensor,
                            cfg: LossConfig) -> Tensor:
    """Pretraining on blur (§2.3): the global score against 1 (original) / 0 (blurred), and the
    per-pixel score against `pixel_target` (0 inside the blurred square, 1 elsewhere), same weights,
    under the pretraining objective `cfg.blur_objective`; with `cfg.blur_pixel_balance` the blurred
    pixels weigh as much as all the others (`balanced_weights`)."""
    weight = balanced_weights(pixel_target) if cfg.blur_pixel_balance else None
    return _weighted(d_out, cfg, is_real_global.float(), pixel_target.float(), cfg.blur_objective, pixel_weight=weight)
