"""The field's perceptual metrics for `evaluate`: LPIPS per face, FID and KID over the whole split.

Both read backbone weights staged on local disk (docs/quality.md, "Perceptual metrics" says how);
nothing is ever downloaded. An empty key, or a missing, unreadable or mismatched file, skips that
metric with one line naming the key and the file; every other metric is still computed.

- LPIPS (Zhang et al., 2018): torchmetrics' LPIPS network, its linear calibration layers read from
  the files torchmetrics ships, over the torchvision backbone `eval.lpips_net` (alex, vgg, squeeze)
  whose ImageNet weights come from `eval.lpips_weights` (a torchvision state dict; `classifier.*` is
  ignored). Per face, the whole composited image against the original, both in [-1, 1] at the
  evaluation size; lower is closer. The whole image and not a crop around the hole: it is what
  inpainting papers report, so the numbers compare; one input size serves every mask kind (under
  `random_box` and `strokes` the hole's box changes size and shape from face to face, and a small
  crop is below what the backbone's strides need); and the seam lies inside the receptive fields.
  The known pixels are equal in both images, so the value is the difference in and around the hole
  diluted by the hole's share of the image: compare LPIPS only at the same mask (eval.json's `mask`).
- FID and KID: set-level, the split's original faces against one fill's composited images, on the
  2048 pool3 features of torch-fidelity's InceptionV3 (the TensorFlow FID network, as torchmetrics'
  `NoTrainInceptionV3`: 8-bit images resized to 299 inside), weights from `eval.inception_weights`.
  FID = |mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^1/2), the last trace exactly from the
  singular values of the centred feature matrices' n_r x n_f product (`fid`). KID: torchmetrics'
  unbiased MMD^2 with the cubic polynomial kernel, mean and std over `KID_SUBSETS` seeded subsets of
  `kid_subset_size(n)` faces. On ~1,000 faces KID is the number to read: FID's estimate is biased
  upwards by an amount that depends on n (and on the network), KID's is not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.functional.image.lpips import _NoTrainLpips
from torchmetrics.image.kid import maximum_mean_discrepancy, poly_kernel

from hybridgan.models.hybrid import ModelWeightsError, read_state_dict

STAGING = 'how to stage it: docs/quality.md, "Perceptual metrics"'
TORCHVISION_NETS = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
INCEPTION_FEATURES = "2048"
KID_SUBSETS = 100
KID_MAX_SUBSET = 1000  # torch-fidelity's and torchmetrics' default subset size


def _torchvision_key(lpips_key: str) -> str:
    """`slice2.3.weight` (alex, vgg) or `slices.1.3.squeeze.weight` (squeeze) -> `features.3...`:
    torchmetrics' slices keep the torchvision `features` index of each layer as its name."""
    parts = lpips_key.split(".")
    return ".".join(["features", *parts[2 if parts[0] == "slices" else 1:]])


def load_lpips(path: str | Path, net: str = "alex") -> nn.Module:
    """torchmetrics' LPIPS network over the torchvision `net` backbone read from `path`, in eval mode.

    The backbone is built without weights (no download) and filled from the file; any defect is a
    ModelWeightsError naming it.
    """
    path, name = Path(path), TORCHVISION_NETS[net]
    model = _NoTrainLpips(net=net, pnet_rand=True)
    names = {_torchvision_key(key): key for key in model.net.state_dict()}
    state = {k: v for k, v in read_state_dict(path, name).items() if not k.startswith("classifier.")}
    missing, unexpected = sorted(names.keys() - state.keys()), sorted(state.keys() - names.keys())
    if missing or unexpected:
        raise ModelWeightsError(f"{path}: not torchvision {name} weights ({len(missing)} keys missing, e.g. "
                                f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    expected = model.net.state_dict()
    for key, value in state.items():
        if value.shape != expected[names[key]].shape:
            raise ModelWeightsError(f"{path}: {key} has shape {tuple(value.shape)}, "
                                    f"{name} expects {tuple(expected[names[key]].shape)}")
    model.net.load_state_dict({names[key]: value for key, value in state.items()})
    return model.eval()


def load_inception(path: str | Path) -> nn.Module:
    """torch-fidelity's InceptionV3 giving pool3 features, weights from `path`; defects: ModelWeightsError.

    The file is first read as tensors only, so that torch-fidelity's own full unpickling of it
    (`torch.load(weights_only=False)`) only ever sees a plain state dict.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = Path(path)
    if path.suffix == ".safetensors":
        raise ModelWeightsError(f"{path}: torch-fidelity reads InceptionV3 weights from a torch.save file, "
                                f"not .safetensors")
    read_state_dict(path, "InceptionV3")
    try:
        return NoTrainInceptionV3("inception-v3-compat", [INCEPTION_FEATURES], str(path))
    except RuntimeError as err:
        raise ModelWeightsError(f"{path}: not torch-fidelity's InceptionV3 weights "
                                f"({str(err).splitlines()[0]})") from None


def _load(key: str, value: str, loader: Callable[[Path], nn.Module], done: str) -> tuple[nn.Module | None, str]:
    if not value:
        return None, f"skipped: {key} is not set ({STAGING})"
    try:
        return loader(Path(value)), done
    except ModelWeightsError as err:
        return None, f"skipped: {key}: {err} ({STAGING})"


@dataclass
class Perceptual:
    """The loaded networks (None where skipped) and, per metric, one line on what was done."""

    lpips_net: nn.Module | None
    inception: nn.Module | None
    notes: dict[str, str]

    def to(self, device: torch.device) -> Perceptual:
        for model in (self.lpips_net, self.inception):
            if model is not None:
                model.to(device)
        return self

    @torch.no_grad()
    def lpips(self, filled: Tensor, real: Tensor) -> Tensor:
        """Per-image LPIPS [n] of [n, 3, S, S] images in [-1, 1] (float32)."""
        return self.lpips_net(filled.float().clamp(-1, 1), real.float().clamp(-1, 1)).flatten()

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """InceptionV3 pool3 features [n, 2048] of [n, 3, S, S] images in [-1, 1], seen as 8-bit."""
        pixels = ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return self.inception(pixels).float()


def load_perceptual(lpips_weights: str, inception_weights: str, lpips_net: str = "alex") -> Perceptual:
    """The perceptual networks of the staged files ("" or a bad file: skipped, with its line in `notes`)."""
    lpips, lpips_note = _load("eval.lpips_weights", lpips_weights, lambda path: load_lpips(path, lpips_net),
                              f"{TORCHVISION_NETS[lpips_net]} backbone from {lpips_weights}; per face, whole "
                              f"composited image against the original")
    inception, inception_note = _load("eval.inception_weights", inception_weights, load_inception,
                                      f"InceptionV3 pool3 features from {inception_weights}; the split's "
                                      f"original faces against each fill's composited images")
    return Perceptual(lpips, inception, {"lpips": lpips_note, "fid_kid": inception_note})


def _centred(features: Tensor) -> Tensor:
    features = features.double()
    return features - features.mean(dim=0)


def fid(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance of the Gaussians fitted to two feature sets [n_r, d], [n_f, d] (n >= 2 each).

    With centred matrices A_r, A_f, S = A^T A / (n - 1) and tr((S_r S_f)^1/2) is the sum of the singular
    values of A_r A_f^T over sqrt((n_r - 1)(n_f - 1)): exact, and an SVD of n_r x n_f rather than the
    eigenvalues of a d x d product (2048 x 2048, seconds, and noisy when n < d leaves S singular).
    """
    a, b = _centred(real), _centred(fake)
    n_r, n_f = a.shape[0] - 1, b.shape[0] - 1
    mean_term = (real.double().mean(dim=0) - fake.double().mean(dim=0)).square().sum()
    root_trace = torch.linalg.svdvals(a @ b.T).sum() / math.sqrt(n_r * n_f)
    value = mean_term + a.square().sum() / n_r + b.square().sum() / n_f - 2 * root_trace
    return max(0.0, float(value))  # a squared distance; only rounding takes it below 0


def kid_subset_size(n: int) -> int:
    """Half the faces, at most KID_MAX_SUBSET: subsets of ~1,000 faces then differ from draw to draw
    (the whole set every time would make the std 0 and say nothing); KID is unbiased at any size."""
    return min(KID_MAX_SUBSET, max(2, n // 2))


def kid(real: Tensor, fake: Tensor, seed: int, subsets: int = KID_SUBSETS) -> tuple[float, float, int]:
    """KID (mean, std over `subsets` seeded subsets, subset size) of two feature sets (n >= 2 each).

    The kernel matrices are computed once and each subset's MMD^2 read from them.
    """
    size = kid_subset_size(min(real.shape[0], fake.shape[0]))
    real, fake = real.double(), fake.double()
    k_rr, k_ff, k_rf = poly_kernel(real, real), poly_kernel(fake, fake), poly_kernel(real, fake)
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        r = torch.randperm(real.shape[0], generator=generator)[:size]
        f = torch.randperm(fake.shape[0], generator=generator)[:size]
        scores.append(maximum_mean_discrepancy(k_rr[r][:, r], k_rf[r][:, f], k_ff[f][:, f]))
    values = torch.stack(scores)
    return float(values.mean()), float(values.std(unbiased=False)), size


def set_metrics(real: Tensor, fake: Tensor, seed: int) -> dict[str, Any]:
    """{"fid", "kid_mean", "kid_std", "kid_subset"} of one fill's features; None each below 2 faces."""
    if min(real.shape[0], fake.shape[0]) < 2:
        return {"fid": None, "kid_mean": None, "kid_std": None, "kid_subset": None}
    mean, std, size = kid(real, fake, seed)
    return {"fid": fid(real, fake), "kid_mean": mean, "kid_std": std, "kid_subset": size}
