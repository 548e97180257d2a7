"""Parameter count and FLOPs of one forward pass, as numbers and as one human line."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


def model_summary(model: nn.Module, *inputs: Tensor, name: str | None = None) -> dict[str, Any]:
    """Count parameters and the FLOPs (2 per multiply-add) of `model(*inputs)` in eval mode, no grad.

    Returns {"name", "params", "flops", "flops_per_image", "image_size", "text"}, where `text` reads
    e.g. "generator: 71.1 M params, 4.3 GFLOP/img at 128x128".
    """
    name = name or type(model).__name__
    params = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.eval()  # BatchNorm on a 1x1 bottleneck cannot run in train mode at batch 1
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        model.train(was_training)
    flops = counter.get_total_flops()
    batch, size = inputs[0].shape[0], inputs[0].shape[-1]
    per_image = flops / batch
    text = f"{name}: {params / 1e6:.1f} M params, {per_image / 1e9:.2f} GFLOP/img at {size}x{size}"
    return {"name": name, "params": params, "flops": flops, "flops_per_image": per_image,
            "image_size": size, "text": text}
