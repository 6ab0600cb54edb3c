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

from ..errors import ConfigError
from .importance import Layers, l1_scores, lamp_scores
from .registry import get_method

LOGGER = logging.getLogger("yolo_prune_plugin")

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


def _data_aware_masks(model: nn.Module, layers: Layers, amount: float, calibration: Any,
                      options: Any) -> tuple[list[torch.Tensor], dict]:
    from .obs import obs_prune  # the data-aware importance (imports this module's helpers, never the reverse)

    return obs_prune(model, layers, amount, calibration, options=options)


#: importance name -> scores of the layers in scope (magnitude-like, cheap)
SCORERS: dict[str, Callable[[Layers], list[torch.Tensor]]] = {"l1": l1_scores, "lamp": lamp_scores}
#: importance name -> ``fn(model, layers, amount, calibration, options) -> (masks, extra)`` (data-aware)
DATA_AWARE: dict[str, Callable[..., tuple[list[torch.Tensor], dict]]] = {"obs": _data_aware_masks}


def prune_model(model: nn.Module, amount: float, method: str = "global", include: Sequence[str] = (),
                exclude: Sequence[str] = (), calibration: Any = None, log: bool = True,
                options: Any = None) -> PruneResult:
    """Prune the Conv2d weights of ``model`` in place to ``amount`` sparsity.

    ``method`` names a :data:`~yolo_prune_plugin.prune.registry.METHODS` entry: its ``scope`` (``global``: one
    threshold over all weights in scope; ``layer``: ``amount`` of each layer, as YOLOv5's
    ``utils.torch_utils.prune``) and its ``importance`` (``l1``, ``lamp``, or the data-aware ``obs``, which
    needs ``calibration`` images and also updates the kept weights; ``options`` are its options dataclass).
    Every method zeroes exactly ``round(amount * total)`` weights in scope (``layer`` scope: per layer).
    """
    try:
        spec = get_method(method)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not 0.0 <= amount < 1.0:
        raise ConfigError(f"amount must satisfy 0 <= amount < 1, got {amount}")
    if spec.data_aware and calibration is None:
        raise ConfigError(f"method {method!r} is data-aware and needs calibration images")
    layers = check_scope(model, include, exclude)
    before = sparsity_stats(model, layers)
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        if amount > 0:
            if spec.data_aware:
                masks, extra = DATA_AWARE[spec.importance](model, layers, amount, calibration, options)
                apply_masks(layers, masks)
            elif spec.scope == "layer" and spec.importance == "l1":
                for _, m in layers:  # torch's own per-layer L1, weight for weight YOLOv5's prune()
                    prune.l1_unstructured(m, "weight", amount=amount)
                    prune.remove(m, "weight")
            elif spec.scope == "layer":
                for (_, m), s in zip(layers, SCORERS[spec.importance](layers)):
                    apply_masks([("", m)], global_masks([s], amount))
            else:
                apply_global_scores(layers, SCORERS[spec.importance](layers), amount)
    seconds = time.perf_counter() - t0
    result = PruneResult(method, amount, before, sparsity_stats(model, layers), seconds, extra)
    if log:
        LOGGER.info(result.log_line())
    return result
