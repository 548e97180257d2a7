"""Eq. 1-6 against hand-computed values, and gradient isolation between the D and G steps."""

from __future__ import annotations

import pytest
import torch

from hybridgan.config import DiscriminatorConfig, GeneratorConfig, LossConfig
from hybridgan.losses import (
    adversarial_loss, blur_discriminator_loss, border_weights, discriminator_joint_loss, fake_loss,
    generator_joint_loss, pixel_loss, real_loss,
)
from hybridgan.models import ContextEncoder, DiscOutput, HybridDiscriminator, PathakDiscriminator

# distinct weights, so that a swapped weight shows up in the value; eq. 2/4/5 read literally (lsgan):
# the L2 of D's raw score against its 0/1 target, so the scores below are the "x" of the equations
CFG = LossConfig(alpha=0.9, beta=0.1, gamma=0.3, epsilon=0.7, global_weight=0.25, pixel_weight=0.75, overlap=0,
                 adversarial="lsgan", blur_objective="lsgan")
GLOBAL = torch.tensor([0.2, 0.6])
PIXEL = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]], [[[0.5, 0.5], [0.0, 1.0]]]])  # [2, 1, 2, 2]
HOLE = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [0.0, 0.0]]]])
HYBRID = DiscOutput(GLOBAL, PIXEL)
PATHAK = DiscOutput(GLOBAL, None)

# By hand. Against ones: global ((0.8^2 + 0.4^2) / 2) = 0.4,
#   pixel (1 + 0.25 + 0 + 0.5625 + 0.25 + 0.25 + 1 + 0) / 8 = 0.4140625.
#   Weighted: 0.25 * 0.4 + 0.75 * 0.4140625 = 0.410546875.
# Eq. 5: global against zeros (0.04 + 0.36) / 2 = 0.2; pixel against 1 - HOLE = [[0,1],[1,1]], [[0,0],[1,1]]:
#   (0 + 0.25 + 0 + 0.5625 + 0.25 + 0.25 + 1 + 0) / 8 = 0.2890625.
#   Weighted: 0.25 * 0.2 + 0.75 * 0.2890625 = 0.266796875.


def test_pixel_loss_eq1() -> None:
    real = torch.zeros(2, 1, 2, 2)
    fake = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[-1.0, 0.5], [0.0, 0.5]]]])
    assert pixel_loss(real, fake).item() == 3.9375  # (1 + 4 + 9 + 16 + 1 + 0.25 + 0 + 0.25) / 8
    assert pixel_loss(real, fake, HOLE).item() == 0.75  # hole pixels 1, 1, 0.25 -> 2.25 / 3


def test_pixel_loss_mask_covers_every_channel() -> None:
    real = torch.zeros(1, 3, 1, 2)
    fake = torch.tensor([[[[1.0, 9.0]], [[2.0, 9.0]], [[3.0, 9.0]]]])
    assert pixel_loss(real, fake, torch.tensor([[[[1.0, 0.0]]]])).item() == pytest.approx(14 / 3)


def test_adversarial_loss_eq2() -> None:
    assert adversarial_loss(HYBRID, CFG, HOLE).item() == pytest.approx(0.410546875, abs=1e-7)
    assert adversarial_loss(PATHAK, CFG).item() == pytest.approx(0.4)  # global term alone, weight 1


def test_generator_joint_loss_eq3() -> None:
    real = torch.zeros(2, 1, 2, 2)
    fake = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[-1.0, 0.5], [0.0, 0.5]]]])
    losses = generator_joint_loss(real, fake, HYBRID, CFG, HOLE)
    assert losses.pixel.item() == 0.75
    assert losses.adv.item() == pytest.approx(0.410546875, abs=1e-7)
    assert losses.joint.item() == pytest.approx(0.9 * 0.75 + 0.1 * 0.410546875, abs=1e-6)  # 0.7160546875


def test_border_weights_mark_a_band_inside_the_hole() -> None:
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 1:7, 1:7] = 1.0  # a 6x6 hole: a 1-px band of 20 pixels around a 4x4 core
    weights = border_weights(mask, band=1, weight=10.0)
    assert weights[0, 0, 0].tolist() == [0.0] * 8 and weights[0, 0, 1, 1:7].tolist() == [10.0] * 6
    assert torch.equal(weights[0, 0, 2:6, 2:6], torch.ones(4, 4))
    assert weights.sum().item() == 20 * 10 + 16
    assert torch.equal(border_weights(mask, band=0, weight=10.0), mask)
    edge = torch.zeros(1, 1, 4, 4)
    edge[..., :, :2] = 1.0  # a hole on the image's left edge: only its right side meets the context
    assert border_weights(edge, band=1, weight=5.0)[0, 0].tolist() == [[1.0, 5.0, 0.0, 0.0]] * 4


def test_overlap_weighted_pixel_loss_trains_the_border_harder() -> None:
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 1:7, 1:7] = 1.0
    real, fake = torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    fake[..., 1, 1:7] = 1.0  # error 1 on the 6 pixels of the band's top row only
    cfg = LossConfig(alpha=1.0, beta=0.0, overlap=1, overlap_weight=10.0)
    losses = generator_joint_loss(real, fake, PATHAK, cfg, mask)
    assert losses.pixel.item() == pytest.approx(6 / 36)  # the logged gen_pixel_loss: plain hole mean
    assert losses.joint.item() == pytest.approx(6 * 10 / (20 * 10 + 16))  # weighted mean
    plain = generator_joint_loss(real, fake, PATHAK, LossConfig(alpha=1.0, beta=0.0, overlap=0), mask)
    assert plain.joint.item() == pytest.approx(6 / 36)


def test_real_loss_eq4() -> None:
    assert real_loss(HYBRID, CFG).item() == pytest.approx(0.410546875, abs=1e-7)
    assert real_loss(PATHAK, CFG).item() == pytest.approx(0.4)


def test_fake_loss_eq5_pixel_target_is_zero_only_in_the_hole() -> None:
    assert fake_loss(HYBRID, CFG, HOLE).item() == pytest.approx(0.266796875, abs=1e-7)
    assert fake_loss(PATHAK, CFG, HOLE).item() == pytest.approx(0.2)
    # a perfect D: 0 globally, 0 in the hole, 1 around it
    perfect = DiscOutput(torch.zeros(2), 1 - HOLE)
    assert fake_loss(perfect, CFG, HOLE).item() == 0.0


def test_discriminator_joint_loss_eq6() -> None:
    perfect_real = DiscOutput(torch.ones(2), torch.ones(2, 1, 2, 2))
    losses = discriminator_joint_loss(perfect_real, HYBRID, CFG, HOLE)
    assert losses.real.item() == 0.0
    assert losses.joint.item() == pytest.approx(0.7 * 0.266796875, abs=1e-7)
    losses = discriminator_joint_loss(HYBRID, HYBRID, CFG, HOLE)
    assert losses.joint.item() == pytest.approx(0.3 * 0.410546875 + 0.7 * 0.266796875, abs=1e-7)  # 0.309921875


def test_blur_discriminator_loss() -> None:
    # global against [1, 0]: (0.64 + 0.36) / 2 = 0.5; pixel against 1 - HOLE as for eq. 5: 0.2890625
    loss = blur_discriminator_loss(HYBRID, torch.tensor([1.0, 0.0]), 1 - HOLE, CFG)
    assert loss.item() == pytest.approx(0.25 * 0.5 + 0.75 * 0.2890625, abs=1e-7)  # 0.341796875
    assert blur_discriminator_loss(PATHAK, torch.tensor([1.0, 0.0]), 1 - HOLE, CFG).item() == pytest.approx(0.5)


def test_a_confident_pathak_d_gives_table2_adv_loss_of_one() -> None:
    sure_fake = DiscOutput(torch.full((16,), -100.0), None)  # sigmoid 0: a probability of "real" of 0
    assert adversarial_loss(sure_fake, LossConfig(adversarial="sigmoid_l2")).item() == 1.0
    assert adversarial_loss(DiscOutput(torch.zeros(16), None), LossConfig(adversarial="lsgan")).item() == 1.0


def _g_gradient(objective: str, score: float) -> float:
    """dL_adv/dscore for G at one score, under `objective`."""
    x = torch.tensor([score], requires_grad=True)
    adversarial_loss(DiscOutput(x, None), LossConfig(adversarial=objective)).backward()
    return x.grad.item()


def test_sigmoid_l2_saturates_where_lsgan_bce_and_hinge_do_not() -> None:
    # a D sure that the fake is fake: sigmoid_l2's gradient -2 p (1 - p)^2 vanishes
    assert abs(_g_gradient("sigmoid_l2", -8.0)) < 1e-3
    assert _g_gradient("lsgan", -8.0) == pytest.approx(2 * (-8.0 - 1.0))  # grows with the distance
    assert _g_gradient("bce", -8.0) == pytest.approx(-torch.sigmoid(torch.tensor(8.0)).item())  # ~ -1
    assert _g_gradient("hinge", -8.0) == -1.0


def test_objective_values_by_hand() -> None:
    real, fake = DiscOutput(torch.tensor([2.0, -0.5]), None), DiscOutput(torch.tensor([0.5, -3.0]), None)
    hinge = LossConfig(adversarial="hinge", gamma=1.0, epsilon=1.0)
    # D: relu(1 - s) on real: (0 + 1.5) / 2; relu(1 + s) on fake: (1.5 + 0) / 2
    assert discriminator_joint_loss(real, fake, hinge, torch.ones(2, 1, 1, 1)).joint.item() == pytest.approx(1.5)
    assert adversarial_loss(fake, hinge).item() == pytest.approx(1.25)  # -mean(s)
    bce = LossConfig(adversarial="bce")
    expected = -torch.log(torch.sigmoid(torch.tensor([0.5, -3.0]))).mean().item()
    assert adversarial_loss(fake, bce).item() == pytest.approx(expected)


def test_losses_are_float32_for_bf16_inputs() -> None:
    low = DiscOutput(GLOBAL.bfloat16(), PIXEL.bfloat16())
    assert real_loss(low, CFG).dtype == torch.float32
    assert fake_loss(low, CFG, HOLE.bfloat16()).dtype == torch.float32
    assert pixel_loss(PIXEL.bfloat16(), HOLE.bfloat16(), HOLE.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("kind", ["hybrid", "pathak"])
def test_d_step_and_g_step_touch_only_their_own_parameters(kind: str) -> None:
    torch.manual_seed(0)
    gen = ContextEncoder(GeneratorConfig(base_channels=8, bottleneck=16), 32, 16)
    disc_cfg = DiscriminatorConfig(decoder_width=4, pathak_channels=8)
    disc = HybridDiscriminator(disc_cfg, 32) if kind == "hybrid" else PathakDiscriminator(disc_cfg, 32)
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    masked = real * (1 - mask)
    cfg = LossConfig()

    # D step (eq. 4-6): G's output detached
    fake = gen(masked, mask).detach()
    discriminator_joint_loss(disc(real), disc(fake), cfg, mask).joint.backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert sum(p.grad.abs().sum() for p in disc.parameters()) > 0
    assert all(p.grad is None for p in gen.parameters())

    # G step (eq. 1-3): D frozen, only G optimised
    disc.zero_grad(set_to_none=True)
    disc.requires_grad_(False)
    disc_before = [p.detach().clone() for p in disc.parameters()]
    gen_before = [p.detach().clone() for p in gen.parameters()]
    optimizer = torch.optim.Adam(gen.parameters(), lr=1e-3)
    fake = gen(masked, mask)
    generator_joint_loss(real, fake, disc(fake), cfg, mask).joint.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.grad is not None for p in gen.parameters())
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(disc.parameters(), disc_before))
    assert all(not torch.equal(p, q) for p, q in zip(gen.parameters(), gen_before))


# The generator's seam and checkerboard options (hybridgan/models/generator.py).

def test_resize_upsampling_leaves_less_period2_pattern_than_transposed_convs() -> None:
    from hybridgan.metrics import period2_amplitude

    masked, mask = torch.rand(8, 3, 64, 64) * 2 - 1, torch.zeros(8, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1.0
    share = {}
    for upsample in ("transposed", "resize"):
        values = []
        for seed in range(3):
            torch.manual_seed(seed)
            gen = ContextEncoder(GeneratorConfig(base_channels=16, bottleneck=64, upsample=upsample), 64, 32)
            with torch.no_grad():
                prediction = gen.predict(masked * (1 - mask), mask)
            assert prediction.shape == (8, 3, 32, 32)
            values.append((period2_amplitude(prediction) / prediction.std()).mean().item())
        share[upsample] = sum(values) / 3
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in list(gen.decoder)[3:])
    # at initialisation a transposed-conv decoder's output is about 23 % period-2 pattern, a resize one 8 %
    assert share["resize"] < share["transposed"] / 2


def test_seam_blend_removes_a_step_along_the_border_and_keeps_the_context() -> None:
    from hybridgan.metrics import hole_metrics
    from hybridgan.models.generator import seam_correction

    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1.0
    rows = torch.arange(32).float().view(1, 1, 32, 1)
    context = (rows / 64 - 0.25).expand(2, 3, 32, 32)  # a vertical ramp
    detail = 0.1 * (torch.arange(32) % 2).float()  # stripes finer than the blend radius
    fill = context + 0.4 + detail  # the right ramp and detail, 0.4 too bright: a hard seam
    corrected = fill + seam_correction(fill, context * (1 - mask), mask, radius=4.0)
    before = hole_metrics(fill * mask + context * (1 - mask), context, mask)
    after = hole_metrics(corrected * mask + context * (1 - mask), context, mask)
    assert before["edge_jump"].min() > 45 and after["edge_jump"].max() < 8
    assert after["colour_shift"].max() < 8  # the offset is gone, not only at the border
    inner = (corrected - context)[..., 12:20, 12:20]
    assert (inner[..., :, 1::2] - inner[..., :, ::2]).mean().item() == pytest.approx(0.1, abs=0.01)  # detail kept
    torch.manual_seed(0)
    gen = ContextEncoder(GeneratorConfig(base_channels=8, bottleneck=16, seam_blend=4.0), 32, 16)
    out = gen(context * (1 - mask), mask)
    assert torch.equal(out * (1 - mask), context * (1 - mask))  # the known pixels exactly


def test_seam_correction_equals_the_shepard_average_over_border_pixels() -> None:
    """The FFT convolution gives, at every hole pixel, the weighted mean of the border mismatches."""
    from hybridgan.models.generator import seam_correction

    torch.manual_seed(0)
    mask = torch.zeros(1, 1, 12, 12)
    mask[..., 3:8, 2:9] = 1.0
    masked = (torch.rand(1, 3, 12, 12) * 2 - 1) * (1 - mask)
    filled = masked + mask * (torch.rand(1, 3, 12, 12) * 2 - 1)
    radius = 2.0
    hole = [(r, c) for r in range(12) for c in range(12) if mask[0, 0, r, c] > 0]
    neighbours = {p: [(p[0] + dr, p[1] + dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
                      if 0 <= p[0] + dr < 12 and 0 <= p[1] + dc < 12 and mask[0, 0, p[0] + dr, p[1] + dc] == 0]
                  for p in hole}
    border = {p: masked[0][:, [n[0] for n in ns], [n[1] for n in ns]].mean(dim=1) - filled[0, :, p[0], p[1]]
              for p, ns in neighbours.items() if ns}
    expected = torch.zeros(3, 12, 12)
    for p in hole:
        weights = torch.tensor([1.0 / ((p[0] - b[0]) ** 2 + (p[1] - b[1]) ** 2 + radius**2) for b in border])
        expected[:, p[0], p[1]] = torch.stack(list(border.values()), dim=1) @ (weights / weights.sum())
    assert torch.allclose(seam_correction(filled, masked, mask, radius)[0], expected, atol=1e-5)


def test_balanced_pixel_weights_give_the_few_blurred_pixels_half_the_term() -> None:
    target = torch.ones(2, 1, 4, 4)
    target[0, 0, :1, :2] = 0.0  # 2 blurred pixels of 32
    cfg = LossConfig(global_weight=0.0, pixel_weight=1.0, blur_objective="lsgan")
    out = DiscOutput(torch.ones(2), torch.ones(2, 1, 4, 4))  # "real" everywhere: wrong by 1 on the blurred pixels only
    plain = blur_discriminator_loss(out, torch.ones(2), target, cfg)
    balanced = blur_discriminator_loss(out, torch.ones(2), target,
                                       LossConfig(global_weight=0.0, pixel_weight=1.0, blur_objective="lsgan",
                                                  blur_pixel_balance=True))
    assert plain.item() == pytest.approx(2 / 32)
    assert balanced.item() == pytest.approx(0.5)  # the blurred half of the weight, all of it wrong by 1
