"""BatchNorm recalibration after pruning: re-estimate running statistics, touch no weight.

Pruning changes what every BatchNorm layer sees, so the running mean/variance stored at training time no
longer match. :func:`recalibrate_bn` resets them and forwards a few training-split images in train mode
with cumulative averaging (``momentum=None``), without gradients; only ``running_mean``, ``running_var``
and ``num_batches_tracked`` change.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch
import torch.nn as nn

__all__ = ["recalibrate_bn", "bn_layers"]


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model`` that tracks running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 8) -> dict:
    """Reset and re-estimate the BatchNorm running statistics of ``model`` from ``images`` (in place).

    ``images``: a float tensor ``(N, 3, H, W)`` in [0, 1] (e.g. from
    :func:`yolo_prune_plugin.prune.calibration.load_calibration_images`) or an iterable of such batches.
    The model's train/eval mode and every momentum are restored afterwards. Returns a summary dict
    (``layers``, ``images``, ``seconds``).
    """
    bns = bn_layers(model)
    if not bns:
        return {"layers": 0, "images": 0, "seconds": 0.0}
    batches = (torch.split(images, max(1, int(batch_size))) if isinstance(images, torch.Tensor) else images)
    was_training = model.training
    momenta = [m.momentum for m in bns]
    p = next(model.parameters())
    t0 = time.perf_counter()
    n = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over all batches
        model.train()
        for x in batches:
            model(x.to(device=p.device, dtype=p.dtype))
            n += int(x.shape[0])
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    if n == 0:
        raise ValueError("recalibrate_bn: no images given")
    return {"layers": len(bns), "images": n, "seconds": round(time.perf_counter() - t0, 3)}
