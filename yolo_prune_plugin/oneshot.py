"""One-shot pruning as the pipeline runs it: prune, then (data-aware methods) BatchNorm recalibration.

:func:`prune_oneshot` is :func:`yolo_prune_plugin.pruning.prune_model` followed, for methods that have
calibration images, by :func:`yolo_prune_plugin.recalibration.recalibrate_bn` on those same images (only
BatchNorm running statistics change; no Conv2d weight, so the sparsity is exactly the method's).
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import torch.nn as nn

from .pruning import PruneResult, prune_model
from .recalibration import recalibrate_bn

__all__ = ["prune_oneshot"]


def prune_oneshot(model: nn.Module, amount: float, method: str = "global", include: Sequence[str] = (),
                  exclude: Sequence[str] = (), calibration: Any = None, recalibrate: bool = True,
                  batch_size: int = 8, log: bool = True) -> PruneResult:
    """Prune ``model`` in place (:func:`prune_model`); then, when ``calibration`` images are given and
    ``recalibrate`` is true, re-estimate its BatchNorm statistics on them. ``result.extra["bn_recalibration"]``
    records what was done and ``result.seconds`` includes it."""
    result = prune_model(model, amount, method, include, exclude, calibration=calibration, log=log)
    if recalibrate and calibration is not None and amount > 0:
        t0 = time.perf_counter()
        info = recalibrate_bn(model, calibration, batch_size=batch_size)
        result.extra = {**result.extra, "bn_recalibration": info}
        result.seconds += time.perf_counter() - t0
    return result
