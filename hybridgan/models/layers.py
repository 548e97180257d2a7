"""Convolutions whose kernel covers the whole input (or output) map, computed as one matrix product.

Pathak's bottleneck is a 4x4 convolution of a 4x4 map to 1x1 (and back, a 4x4 transposed convolution
of 1x1 to 4x4). Mathematically each is a fully connected layer; as convolutions, oneDNN runs them
at a fraction of the GEMM rate on the CPU (at batch 16, 128x128: 0.41 s forward and backward of the
4000-channel bottleneck against 0.12 s as a matrix product, one thread). These subclasses keep the
parameters, their shapes and names, the initialisation and the state dict of `nn.Conv2d` /
`nn.ConvTranspose2d`, and compute the same values with `F.linear` / a matmul; an input of another
size fails in the matrix product.

On the CPU they compute in the weight's dtype even under bf16 autocast. At training batch sizes these
products are memory-bound (the 4000-channel bottleneck's two weights are 65 M of G's 71 M
parameters), so bf16 does not make the product faster, and autocast would cast each 131 MB weight to
bf16 at every forward and each bf16 weight gradient back to float32 in the backward: at batch 16,
128x128, one thread, those four copies took 155 ms of a 650 ms Pathak step. On a GPU autocast
applies as to any layer.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _weight_precision_on_cpu(x: Tensor) -> Any:
    """Autocast off on the CPU (the product then runs in the weight's dtype), a no-op elsewhere."""
    return torch.autocast("cpu", enabled=False) if x.device.type == "cpu" else nullcontext()


class WholeInputConv2d(nn.Conv2d):
    """`nn.Conv2d(in, out, k, stride=1, padding=0, bias=False)` applied to a k x k input: [B, out, 1, 1]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size, 1, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        with _weight_precision_on_cpu(x):
            flat = x.reshape(x.shape[0], -1).to(self.weight.dtype)
            return F.linear(flat, self.weight.reshape(self.out_channels, -1))[:, :, None, None]


class WholeOutputConvTranspose2d(nn.ConvTranspose2d):
    """`nn.ConvTranspose2d(in, out, k, stride=1, padding=0, bias=False)` of a 1x1 input: [B, out, k, k]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size, 1, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        with _weight_precision_on_cpu(x):
            out = x.reshape(x.shape[0], -1).to(self.weight.dtype) @ self.weight.reshape(self.in_channels, -1)
        return out.view(x.shape[0], self.out_channels, *self.weight.shape[-2:])
