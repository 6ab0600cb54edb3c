"""Unstructured pruning of a YOLOv5 model's Conv2d weights to one global sparsity.

Masks are carried by ``torch.nn.utils.prune`` and made permanent with ``prune.remove``; the functions work
on any ``nn.Module`` and never ``isinstance``-check YOLOv5 classes.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.utils import prune

from .config import DATA_AWARE_METHODS, METHODS
from .errors import ConfigError

LOGGER = logging.getLogger("yolo_prune_plugin")

Layers = list[tuple[str, nn.Conv2d]]


@dataclass
class LayerStats:
    name: str
    shape: list[int]
    weights: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.weights if self.weights else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "sparsity": round(self.sparsity, 6)}


@dataclass
class SparsityStats:
    """Zero counts over the Conv2d weights in scope, and the model's parameter count."""

    layers: list[LayerStats]
    parameters: int

    @property
    def weights(self) -> int:
        return sum(s.weights for s in self.layers)

    @property
    def zeros(self) -> int:
        return sum(s.zeros for s in self.layers)

    @property
    def nonzero(self) -> int:
        return self.weights - self.zeros

    @property
    def sparsity(self) -> float:
        return self.zeros / self.weights if self.weights else 0.0

    def to_dict(self, per_layer: bool = True) -> dict:
        d: dict[str, Any] = {"parameters": self.parameters, "conv_weights": self.weights, "zeros": self.zeros,
                             "nonzero": self.nonzero, "sparsity": round(self.sparsity, 6)}
        if per_layer:
            d["layers"] = [s.to_dict() for s in self.layers]
        return d


@dataclass
class PruneResult:
    """What :func:`prune_model` did."""

    method: str
    amount: float
    before: SparsityStats
    after: SparsityStats
    seconds: float
    extra: dict = field(default_factory=dict)

    def log_line(self) -> str:
        b, a = self.before, self.after
        return (f"Pruned: {b.zeros}/{b.weights} ({100 * b.sparsity:.2f}%) -> {a.zeros}/{a.weights} "
                f"({100 * a.sparsity:.2f}%) [method={self.method}, {len(a.layers)} Conv2d layers, "
                f"{self.seconds:.2f}s]")


def conv_layers(model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Layers:
    """The Conv2d modules in scope, as ``(name, module)`` in model order.

    ``include``/``exclude`` are ``fnmatch`` patterns on module names (``model.24.*``, ``*.cv1.conv``); a
    pattern also matches everything below a matching module. Empty ``include`` means every Conv2d.
    """
    def hit(name: str, pats: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p.rstrip(".*") + ".*") for p in pats)

    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and (not include or hit(name, include)) and not hit(name, exclude):
            out.append((name, m))
    return out


def check_scope(model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = (),
                source: str = "config") -> Layers:
    """Like :func:`conv_layers`, but raise :class:`ConfigError` for patterns that match nothing or an empty scope."""
    all_convs = conv_layers(model)
    if not all_convs:
        raise ConfigError(f"{source}: the model has no Conv2d layers to prune")
    for key, pats in (("include", include), ("exclude", exclude)):
        for p in pats:
            if not conv_layers(model, include=(p,)):
                sample = ", ".join(n for n, _ in all_convs[:3])
                raise ConfigError(f"{source}: '{key}' pattern {p!r} matches no Conv2d module (names look like "
                                  f"{sample}, ...)")
    layers = conv_layers(model, include, exclude)
    if not layers:
        raise ConfigError(f"{source}: include/exclude leave no Conv2d layer in scope")
    return layers


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sparsity_stats(model: nn.Module, layers: Optional[Layers] = None) -> SparsityStats:
    """Zero counts of the Conv2d weights (in ``layers``, default all) of ``model``."""
    layers = conv_layers(model) if layers is None else layers
    stats = [LayerStats(n, list(m.weight.shape), m.weight.numel(), int((m.weight == 0).sum()))
             for n, m in layers]
    return SparsityStats(stats, count_parameters(model))


# ---------------------------------------------------------------------------------------------------
# importance scores
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


SCORERS: dict[str, Callable[[Layers], list[torch.Tensor]]] = {"global": l1_scores, "lamp": lamp_scores}


# ---------------------------------------------------------------------------------------------------
# pruning
# ---------------------------------------------------------------------------------------------------
def global_masks(scores: Sequence[torch.Tensor], amount: float) -> list[torch.Tensor]:
    """0/1 masks that zero exactly ``round(amount * total)`` of the lowest ``scores`` over all layers.

    One ``kthvalue`` threshold (linear time, unlike a full sort/top-k); ties at the threshold are broken
    deterministically so the count is exact.
    """
    flat = torch.cat([s.detach().flatten().float() for s in scores])
    k = int(round(amount * flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        t = torch.kthvalue(flat.cpu(), k).values.to(flat.device)
        keep = flat > t
        excess = int((~keep).sum()) - k  # ties at the threshold beyond the k-th: keep the last of them
        if excess > 0:
            tied = torch.nonzero(flat == t).flatten()
            keep[tied[-excess:]] = True
    return [m.view_as(s) for m, s in zip(torch.split(keep, [s.numel() for s in scores]), scores)]


def apply_global_scores(layers: Layers, scores: Sequence[torch.Tensor], amount: float) -> None:
    """Zero the ``round(amount * total)`` lowest-scoring weights over all ``layers`` and make it permanent."""
    apply_masks(layers, global_masks(scores, amount))


def apply_masks(layers: Layers, masks: Sequence[torch.Tensor]) -> None:
    """Apply precomputed 0/1 masks through ``torch.nn.utils.prune`` and make them permanent."""
    for (_, m), mask in zip(layers, masks):
        prune.custom_from_mask(m, "weight", mask.to(device=m.weight.device, dtype=m.weight.dtype))
        prune.remove(m, "weight")


def prune_model(model: nn.Module, amount: float, method: str = "global", include: Sequence[str] = (),
                exclude: Sequence[str] = (), calibration: Any = None, log: bool = True) -> PruneResult:
    """Prune the Conv2d weights of ``model`` in place to ``amount`` sparsity.

    ``global``: one L1 threshold over all weights in scope. ``layerwise``: ``amount`` of each layer (YOLOv5's
    ``utils.torch_utils.prune``). ``lamp``: one threshold over LAMP scores. ``obs``: data-aware, needs
    ``calibration`` (see :mod:`yolo_prune_plugin.methods`), also updates the kept weights. All methods zero
    exactly ``round(amount * total)`` weights in scope (``layerwise``: per layer).
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if not 0.0 <= amount < 1.0:
        raise ConfigError(f"amount must satisfy 0 <= amount < 1, got {amount}")
    if method in DATA_AWARE_METHODS and calibration is None:
        raise ConfigError(f"method {method!r} is data-aware and needs calibration images")
    layers = check_scope(model, include, exclude)
    before = sparsity_stats(model, layers)
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        if amount > 0:
            if method == "layerwise":
                for _, m in layers:
                    prune.l1_unstructured(m, "weight", amount=amount)
                    prune.remove(m, "weight")
            elif method in SCORERS:
                apply_global_scores(layers, SCORERS[method](layers), amount)
            else:
                from . import methods

                masks, extra = methods.DATA_AWARE[method](model, layers, amount, calibration)
                apply_masks(layers, masks)
    seconds = time.perf_counter() - t0
    result = PruneResult(method, amount, before, sparsity_stats(model, layers), seconds, extra)
    if log:
        LOGGER.info(result.log_line())
    return result
