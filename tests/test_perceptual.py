"""LPIPS, FID and KID plumbing on stand-in (random) weights: shapes, known answers, staging errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from hybridgan.models.hybrid import ModelWeightsError
from hybridgan.perceptual import STAGING, fid, kid, kid_subset_size, load_inception, load_lpips, load_perceptual


def smooth_faces(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """[n, 3, size, size] images in [-1, 1]: upsampled random 4x4 colour fields, face-like smoothness."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def test_lpips_is_zero_on_the_same_image_and_grows_with_distortion(standin_lpips_weights, no_downloads):
    perceptual = load_perceptual(str(standin_lpips_weights), "")
    net = perceptual.lpips_net
    faces = smooth_faces(4)
    same = perceptual.lpips(faces, faces)
    assert same.shape == (4,) and torch.equal(same, torch.zeros(4))
    noise = torch.randn(faces.shape, generator=torch.Generator().manual_seed(1))
    values = [perceptual.lpips((faces + sigma * noise).clamp(-1, 1), faces) for sigma in (0.02, 0.1, 0.4)]
    assert all(torch.isfinite(v).all() and v.shape == (4,) for v in values)
    assert (values[0] > 0).all() and (values[0] < values[1]).all() and (values[1] < values[2]).all()
    # the staged backbone is the one in use, and the linear layers are torchmetrics' shipped ones
    staged = torch.load(standin_lpips_weights, weights_only=True)
    assert torch.equal(getattr(net.net.slice1, "0").weight, staged["features.0.weight"])
    assert torch.equal(getattr(net.net.slice5, "10").bias, staged["features.10.bias"])
    assert net.lin0.model[1].weight.abs().sum() > 0 and not net.training


def test_lpips_reads_a_full_torchvision_state_dict_and_refuses_another_network(tmp_path, no_downloads):
    torch.manual_seed(0)
    squeeze = tmp_path / "squeezenet1_1.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), squeeze)  # classifier.* included
    faces = smooth_faces(2)
    values = load_lpips(squeeze, "squeeze")(faces, faces.flip(0)).flatten()
    assert values.shape == (2,) and (values > 0).all()
    with pytest.raises(ModelWeightsError) as err:
        load_lpips(squeeze, "alex")
    assert str(err.value).startswith(f"{squeeze}: not torchvision alexnet weights (") and "\n" not in str(err.value)


def test_fid_matches_torchmetrics_and_kid_is_unbiased():
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(200, 16, generator=gen), torch.randn(150, 16, generator=gen) * 1.3 + 0.5

    class Features(nn.Module):  # torchmetrics' FID on features given directly
        num_features = 16

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    reference = FrechetInceptionDistance(feature=Features())
    reference.update(real, real=True)
    reference.update(fake, real=False)
    assert fid(real, fake) == pytest.approx(float(reference.compute()), rel=1e-5)
    assert fid(real, real) == pytest.approx(0.0, abs=1e-9) and fid(real, fake) > 1.0
    # KID: an unbiased MMD^2, about 0 for two draws of one distribution, clearly positive for two
    same, _, _ = kid(real, torch.randn(200, 16, generator=gen), seed=0)
    apart, std, size = kid(real, fake, seed=0)
    assert abs(same) < 0.1 * apart and std > 0 and size == 75
    assert kid(real, fake, seed=0) == (apart, std, size)  # seeded subsets
    assert [kid_subset_size(n) for n in (2, 3, 9, 1000, 5000)] == [2, 2, 4, 500, 1000]


def test_inception_features_and_fid_on_images(standin_inception_weights, no_downloads):
    perceptual = load_perceptual("", str(standin_inception_weights))
    assert perceptual.notes["fid_kid"].startswith(f"InceptionV3 pool3 features from {standin_inception_weights}")
    faces = smooth_faces(3)
    features = perceptual.features(faces)
    assert features.shape == (3, 2048) and torch.isfinite(features).all() and features.std() > 1e-3
    other = perceptual.features(-faces)
    assert fid(features, features) == pytest.approx(0.0, abs=1e-6) and fid(features, other) > 1e-3
    assert not perceptual.inception.training


def test_missing_or_bad_weights_skip_with_one_line(tmp_path, standin_lpips_weights, no_downloads):
    notes = load_perceptual("", "").notes
    assert notes == {"lpips": f"skipped: eval.lpips_weights is not set ({STAGING})",
                     "fid_kid": f"skipped: eval.inception_weights is not set ({STAGING})"}
    garbage = tmp_path / "inception.pth"
    garbage.write_bytes(b"not a checkpoint")
    perceptual = load_perceptual(str(tmp_path / "alexnet.pth"), str(garbage))
    assert perceptual.lpips_net is None and perceptual.inception is None
    assert perceptual.notes["lpips"] == (f"skipped: eval.lpips_weights: {tmp_path / 'alexnet.pth'}: alexnet weights "
                                         f"file not found ({STAGING})")
    assert perceptual.notes["fid_kid"].startswith(f"skipped: eval.inception_weights: {garbage}: not a readable "
                                                  f"weights file")
    with pytest.raises(ModelWeightsError, match="not torch-fidelity's InceptionV3 weights"):
        load_inception(standin_lpips_weights)
    assert all("\n" not in note for note in perceptual.notes.values())
