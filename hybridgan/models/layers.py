"""Convolutions whose kernel covers the whole input (or output) map, computed as one matrix product.

Pathak's bottleneck is a 4x4 convolution of a 4x4 map to 1x1 (and back, a 4x4 transposed convolution
of 1x1 to 4x4). Mathematically each is a fully connected layer; as convolutions, oneDNN runs them
at a fraction of the GEMM rate on the CPU (at batch 16, 128x128: 0.41 s forward and backward of the
4000-channel bottleneck against 0.12 s as a matrix product, one thread). These subclasses keep the
parameters, their shapes and names, the initialisation and the state dict of `nn.Conv2d` /
`nn.ConvTranspose2d`, and compute the same values with `F.linear` / a matmul; an input of another
size fails in the matrix product.

Under autocast the products run in its dtype, as `nn.Linear` would. At training batch sizes they are
memory-bound (the 4000-channel bottleneck's two weights are 65 M of G's 71 M parameters), and bf16
halves the bytes each product reads: on the CPU at batch 16, 128x128, one thread, the Pathak step ran
429-446 ms with bf16 products against 474-487 ms with float32 ones, once glibc keeps freed memory
(`hybridgan.host_memory`; without that, the bf16 weight copies and gradient casts were page-faulted
in afresh every step and float32 was faster, 574 against 654 ms).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class WholeInputConv2d(nn.Conv2d):
    """`nn.Conv2d(in, out, k, stride=1, padding=0, bias=False)` applied to a k x k input: [B, out, 1, 1]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size, 1, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.reshape(x.shape[0], -1), self.weight.reshape(self.out_channels, -1))[:, :, None, None]


class WholeOutputConvTranspose2d(nn.ConvTranspose2d):
    """`nn.ConvTranspose2d(in, out, k, stride=1, padding=0, bias=False)` of a 1x1 input: [B, out, k, k]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size, 1, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = x.reshape(x.shape[0], -1) @ self.weight.reshape(self.in_channels, -1)
        return out.view(x.shape[0], self.out_channels, *self.weight.shape[-2:])
