"""Per-layer counts: how many weights each Conv2d loses for one global ``amount`` (the ``obs`` allocations).

``global`` ranks every weight of every layer together by magnitude (the best measured); the other
allocations (:data:`ALLOCATIONS`) are kept as options. See :func:`layer_counts`.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from typing import Optional, Sequence

import torch

from ..errors import ConfigError
from .importance import Layers, l1_scores, lamp_scores
from .registry import OBS_ALLOCATIONS

LOGGER = logging.getLogger("yolo_prune_plugin")

ALLOCATIONS = OBS_ALLOCATIONS


# ---------------------------------------------------------------------------------------------------
# per-layer counts
# ---------------------------------------------------------------------------------------------------
def _fit_counts(target: Sequence[float], lower: Sequence[int], upper: Sequence[int], total: int) -> list[int]:
    """Integers within ``[lower, upper]`` summing to ``total``, close to ``target`` (largest remainders)."""
    n = len(target)
    counts = [min(max(int(math.floor(t)), lo), up) for t, lo, up in zip(target, lower, upper)]
    diff = total - sum(counts)
    # hand out (or take back) one at a time, preferring the largest remainder (smallest when taking)
    order = sorted(range(n), key=lambda i: target[i] - counts[i], reverse=diff > 0)
    while diff != 0:
        moved = False
        for i in order:
            if diff > 0 and counts[i] < upper[i]:
                counts[i] += 1
                diff -= 1
                moved = True
            elif diff < 0 and counts[i] > lower[i]:
                counts[i] -= 1
                diff += 1
                moved = True
            if diff == 0:
                break
        if not moved:
            raise ValueError("per-layer bounds cannot meet the total")  # only on contradictory bounds
    return counts


def _global_counts(scores: Sequence[torch.Tensor], k: int) -> list[int]:
    """How many of the ``k`` lowest scores over all tensors fall in each tensor (ties: earlier first)."""
    if k == 0:
        return [0] * len(scores)
    flat = torch.cat([s.detach().flatten().float().cpu() for s in scores])
    idx = torch.argsort(flat, stable=True)[:k]
    owner = torch.repeat_interleave(torch.arange(len(scores)), torch.tensor([s.numel() for s in scores]))
    return torch.bincount(owner[idx], minlength=len(scores)).tolist()


def layer_counts(layers: Layers, amount: float, allocation: str = "global", protect: Sequence[str] = (),
                 scores: Optional[Sequence[torch.Tensor]] = None) -> list[int]:
    """Weights to zero in each layer; the sum is exactly ``round(amount * total)``.

    ``global``: the counts of one magnitude threshold over all layers; ``lamp``: of one LAMP threshold;
    ``uniform``: ``amount`` of every layer; ``hessian``: of one threshold over ``scores`` (see
    :func:`_hessian_scores`). Layers matching ``protect`` get 0 and the others take their share
    (capped at all-but-one weight per layer). Weights that are already exactly zero always count as pruned.
    """
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"obs allocation must be one of {', '.join(ALLOCATIONS)}; got {allocation!r}")
    sizes = [m.weight.numel() for _, m in layers]
    total = sum(sizes)
    k = int(round(amount * total))
    zeros = [int((m.weight == 0).sum()) for _, m in layers]
    prot = [any(fnmatch.fnmatchcase(n, p) for p in protect) for n, _ in layers]
    free = [i for i in range(len(layers)) if not prot[i]]
    if not free:
        raise ConfigError("obs: 'protect' patterns leave no layer to prune")
    sub = [layers[i] for i in free]
    if allocation == "uniform":
        share = k / sum(sizes[i] for i in free)
        target = [share * sizes[i] for i in free]
    else:
        if allocation == "hessian":
            if scores is None:
                raise ConfigError("obs: allocation 'hessian' needs per-weight scores")
            scores = [scores[i] for i in free]
        else:
            scores = l1_scores(sub) if allocation == "global" else lamp_scores(sub)
        target = [float(c) for c in _global_counts(scores, k)]
    lower = [min(zeros[i], sizes[i] - 1) for i in free]
    upper = [max(sizes[i] - 1, lower[j]) for j, i in enumerate(free)]
    if k > sum(upper):
        raise ConfigError(f"obs: cannot zero {k} weights while leaving one weight in every pruned layer")
    sub_counts = _fit_counts(target, lower, upper, max(k, sum(lower)))
    counts = [0] * len(layers)
    for j, i in enumerate(free):
        counts[i] = sub_counts[j]
    return counts
