"""Importance scores of Conv2d weights (what to rank); torch only, no other plugin module.

Each function takes the layers in scope as ``(name, Conv2d)`` pairs and returns one score tensor per layer,
shaped like its weight; lower scores are pruned first.
"""

from __future__ import annotations

import torch
import torch.nn as nn

Layers = list[tuple[str, nn.Conv2d]]

__all__ = ["Layers", "l1_scores", "lamp_scores"]


# ---------------------------------------------------------------------------------------------------
def l1_scores(layers: Layers) -> list[torch.Tensor]:
    """|W| per weight (global magnitude pruning)."""
    return [m.weight.detach().abs() for _, m in layers]


def lamp_scores(layers: Layers) -> list[torch.Tensor]:
    """LAMP scores (Lee et al., ICLR 2021): ``w_u^2 / sum_{v >= u} w_v^2`` within each layer.

    Weights are sorted by magnitude ascending; the denominator sums the squares of the weight itself and
    every larger one. The largest weight of each layer scores 1, so no layer is pruned away entirely.
    """
    out = []
    for _, m in layers:
        sq = m.weight.detach().float().flatten() ** 2
        sorted_sq, idx = torch.sort(sq)
        tail = torch.flip(torch.cumsum(torch.flip(sorted_sq, [0]), 0), [0])  # sum of this and all larger
        scores = torch.empty_like(sq)
        scores[idx] = sorted_sq / tail.clamp_min(torch.finfo(tail.dtype).tiny)
        out.append(scores.view_as(m.weight))
    return out
