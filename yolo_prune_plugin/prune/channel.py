"""Structured (channel) pruning of a YOLOv5 model with Torch-Pruning: whole output channels are removed.

Unlike :mod:`yolo_prune_plugin.prune.unstructured` (zeros inside dense tensors), the result is a smaller
``DetectionModel``: fewer parameters, fewer FLOPs, a smaller file and lower latency. Torch-Pruning's
``DependencyGraph`` finds every coupling (BatchNorm, the consumers' input channels, C3 residual adds,
``Concat``), so each *group* of coupled channels is removed together.

Selection is done here, not by Torch-Pruning's pruner, for three reasons: the target ``amount`` is the
fraction of **Conv2d weights** in scope removed (not a channel ratio), it is met by bisection on a global
importance threshold; channel counts are rounded to the *nearest* multiple of ``round_to`` (Torch-Pruning
rounds the kept count *down*, which can leave 0 channels), or of a smaller divisor of it on narrow layers so
that one rounding step never moves more than ``round_share`` of a layer (:func:`round_step`); and a per-layer floor (``max_layer_ratio``) keeps
every group alive.

Importance (``importance=``): ``l1``/``l2`` (group magnitude, Torch-Pruning's ``GroupMagnitudeImportance``),
``bn`` (BatchNorm scale), ``lamp``, and the data-aware ``taylor`` (first-order Taylor, gradients from YOLOv5's
own ``ComputeLoss`` on labelled train-split images, see :func:`load_calibration_batch`) and ``obs`` (structured
OBS: the consumers' output error with their other weights refitted, on train-split images,
:func:`~yolo_prune_plugin.prune.channel_sensitivity.obs_scores`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError, PruneError
from .calibration import accumulate_loss_gradients
from .channel_groups import (_build_groups, _importance, _weights, channel_counts, channel_macs, detect_output_convs,
                             gflops, plan_weights)
from .registry import CHANNEL_ALLOCATIONS, CHANNEL_IMPORTANCES, DATA_AWARE_CHANNEL_IMPORTANCES, ChannelOptions
from .unstructured import check_scope, conv_layers, count_parameters

LOGGER = logging.getLogger("yolo_prune_plugin")


#: importance criteria; the data-aware ones need ``calibration=(images, targets)``
IMPORTANCES = CHANNEL_IMPORTANCES


DATA_AWARE_IMPORTANCES = DATA_AWARE_CHANNEL_IMPORTANCES


#: defaults chosen by measurement (scripts/benchmark_structured.py): Taylor when labelled calibration images are
#: given (one-shot mAP50-95 at 10 %: 0.177 vs 0.070 for L1, both + BN recalibration), else L1
DEFAULT_IMPORTANCE = "taylor"


FALLBACK_IMPORTANCE = "l1"


DEFAULT_ROUND_TO = ChannelOptions.round_to


DEFAULT_MAX_LAYER_RATIO = ChannelOptions.max_layer_ratio


DEFAULT_ROUND_SHARE = ChannelOptions.round_share


DEFAULT_ALLOCATION = "global"  # the function's default; the pipeline resolves ChannelOptions.allocation (None: by data)


#: the achieved fraction is within this of ``amount`` (raises otherwise)
AMOUNT_TOLERANCE = 0.02


#: exponent of the FLOP-aware ranking (``channel_prune(cost_aware=)``); 0: plain importance ranking
DEFAULT_COST_AWARE = ChannelOptions.cost_aware


@dataclass
class ChannelPruneResult:
    """What :func:`channel_prune` did (the model was changed in place)."""

    importance: str
    amount: float
    achieved: float  # fraction of the in-scope Conv2d weights removed
    round_to: int
    params_before: int
    params_after: int
    gflops_before: Optional[float]
    gflops_after: Optional[float]
    conv_weights_before: int  # in scope
    conv_weights_after: int
    channels_before: dict[str, list[int]]
    channels_after: dict[str, list[int]]
    ratio: float  # fraction of all ranked channels selected globally (before rounding) that met the amount
    seconds: float
    extra: dict = field(default_factory=dict)
    #: conv name -> indices of the original output channels it kept (only convs that lost some)
    kept: dict = field(default_factory=dict, repr=False)
    #: group root conv name -> indices of the channels removed (``channel_prune(plan=...)`` repeats it exactly)
    plan: dict = field(default_factory=dict, repr=False)

    def to_dict(self, per_layer: bool = True) -> dict:
        d = {"structure": "channel", "importance": self.importance, "amount": self.amount,
             "achieved": round(self.achieved, 6), "round_to": self.round_to, "params_before": self.params_before,
             "params_after": self.params_after, "gflops_before": self.gflops_before,
             "gflops_after": self.gflops_after, "conv_weights_before": self.conv_weights_before,
             "conv_weights_after": self.conv_weights_after, "channel_ratio": round(self.ratio, 6),
             "seconds": round(self.seconds, 3), **self.extra}
        if per_layer:
            d["channels"] = {n: {"before": self.channels_before[n], "after": c}
                             for n, c in self.channels_after.items()}
        return d

    def log_line(self) -> str:
        return (f"Channel-pruned ({self.importance}, round_to={self.round_to}): {self.achieved:.2%} of "
                f"{self.conv_weights_before} Conv2d weights removed; params {self.params_before} -> "
                f"{self.params_after}, GFLOPs {self.gflops_before} -> {self.gflops_after} [{self.seconds:.1f}s]")


def round_step(n: int, round_to: int, round_share: float = DEFAULT_ROUND_SHARE) -> int:
    """The rounding step of a group of ``n`` channels: the largest divisor of ``round_to`` that is at most
    ``round_share * n`` (at least 1), so one rounding step never moves more than that share of a narrow layer
    (a 16-channel stem with ``round_to=8``, ``round_share=0.125`` rounds to multiples of 2, not 8)."""
    r = max(1, int(round_to))
    cap = max(1.0, float(round_share) * n)
    return max(d for d in range(1, r + 1) if r % d == 0 and d <= cap)


def _keep_count(n: int, n_prune: int, round_to: int, floor: int, round_share: float = 1.0) -> int:
    """Channels kept: nearest multiple of the group's :func:`round_step`, at least ``floor`` (itself rounded up),
    at most ``n``."""
    kept = n - n_prune
    r = round_step(n, round_to, round_share)
    kept = int(round(kept / r)) * r
    floor = max(r, int(math.ceil(floor / r)) * r)
    return int(min(n, max(kept, floor)))


def _plan(scores: dict[str, torch.Tensor], k: int, round_to: int, max_layer_ratio: float,
          round_share: float = 1.0) -> dict:
    """Channel indices to remove per group root when the ``k`` globally lowest-ranked channels go.

    Ranking is by normalised importance over all groups (ties broken by position, so equal scores, e.g. an
    untrained model's BatchNorm scales, still give every ``k`` its own plan); each group's count is then rounded
    (:func:`_keep_count`).
    """
    names = list(scores)
    flat = torch.cat([scores[n] for n in names])
    owner = torch.cat([torch.full((len(scores[n]),), i) for i, n in enumerate(names)])
    order = torch.sort(flat, stable=True).indices[: max(0, int(k))]
    counts = torch.bincount(owner[order], minlength=len(names)).tolist()
    plan = {}
    for name, n_prune in zip(names, counts):
        s = scores[name]
        n = len(s)
        kept = _keep_count(n, n_prune, round_to, math.ceil(n * (1 - max_layer_ratio)), round_share)
        if kept < n:
            plan[name] = torch.sort(s, stable=True).indices[: n - kept].tolist()
    return plan


def _apply_plan(model: nn.Module, plan: dict, ignored_names: Sequence[str], imgsz: int) -> None:
    mods = dict(model.named_modules())
    _, groups = _build_groups(model, [mods[n] for n in ignored_names], imgsz)
    for name, g in groups:
        idxs = plan.get(name)
        if idxs:
            g.prune(idxs=list(idxs))


def _scores(model: nn.Module, importance: str, ignored_names: list, calibration: Any, trace_imgsz: int,
            cost_aware: float, allocation: str = DEFAULT_ALLOCATION, imgsz: int = 640,
            latency_cache: Optional[Path] = None
            ) -> tuple[dict[str, torch.Tensor], Optional[float], Optional[dict]]:
    """Each channel group's ranking scores (root conv name -> one score per channel: the importance, or with
    ``allocation: sensitivity`` the measured error; ``latency``: that error, or the importance without images,
    per millisecond a channel costs on ONNX Runtime at ``imgsz``), the calibration loss of the data-aware
    criteria (None otherwise) and the sensitivity / latency summary (None without it)."""
    mods = dict(model.named_modules())
    loss = None
    images = calibration[0] if isinstance(calibration, (tuple, list)) else calibration
    if importance == "taylor":
        if not (isinstance(calibration, (tuple, list)) and len(calibration) == 2):
            raise ConfigError(f"importance {importance!r} needs calibration=(images, targets) from "
                              "load_calibration_batch (train-split images with labels)")
        loss = accumulate_loss_gradients(model, calibration[0], calibration[1])
    elif importance in DATA_AWARE_IMPORTANCES and not isinstance(images, torch.Tensor):
        raise ConfigError(f"importance {importance!r} needs calibration images (train split)")
    imp = _importance("l1" if importance == "obs" else importance)  # obs: l1 orders unmeasured groups
    dg, groups = _build_groups(model, [mods[n] for n in ignored_names], trace_imgsz)
    scores: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, g in groups:
            s = imp(g)
            if s is not None:
                scores[name] = s.detach().float().cpu()
    if importance == "taylor":
        for p in model.parameters():
            p.grad = None
    if not scores:
        raise PruneError("channel pruning: no prunable channel group in scope")
    sens = None
    if importance == "obs":
        from .channel_sensitivity import obs_scores

        scores, sens = obs_scores(model, [(n, g) for n, g in groups if n in scores], dg, scores, images)
    if allocation == "sensitivity" or (allocation == "latency" and isinstance(images, torch.Tensor)):
        from .channel_sensitivity import sensitivity_scores

        scores, sens_a = sensitivity_scores(model, [(n, g) for n, g in groups if n in scores], dg, scores, images)
        sens = {**(sens or {}), **sens_a}
    if allocation == "latency":  # the least accuracy per millisecond saved goes first
        from .latency import channel_latency, latency_table

        table = latency_table(model, imgsz, cache=latency_cache)
        ms = channel_latency(model, [(n, g) for n, g in groups if n in scores], dg, table)
        mean = sum(ms.values()) / len(ms)
        for n in scores:
            scores[n] = scores[n] / (ms[n] / mean)
        sens = {**(sens or {}), "latency": {"imgsz": imgsz, "runtime": table["key"]["runtime"], "threads": 1,
                                            "measured": table["measured"], "layers": len(table["layers"]),
                                            "cache": str(latency_cache) if latency_cache else None,
                                            "ms_per_channel": {n: round(v, 5) for n, v in ms.items()}}}
    if cost_aware:
        macs = channel_macs(model, [(n, g) for n, g in groups if n in scores], dg, trace_imgsz)
        mean = sum(macs.values()) / len(macs)
        for n in scores:
            scores[n] = scores[n] / (macs[n] / mean) ** float(cost_aware)
    return scores, loss, sens


def _search(model: nn.Module, amount: float, scope: list, w_before: int, ignored_names: list, importance: str,
            calibration: Any, trace_imgsz: int, cost_aware: float, allocation: str, round_to: int,
            max_layer_ratio: float, round_share: float, tolerance: float, cache: Optional[dict], imgsz: int = 640,
            latency_cache: Optional[Path] = None) -> tuple:
    """Importance once on the original model, then bisection on the number ``k`` of globally lowest-ranked
    channels removed until ``amount`` is met; ``(achieved, k, plan, scores, loss, sensitivity, total)``."""
    cache = {} if cache is None else cache
    if "scores" not in cache:
        cache["scores"], cache["loss"], cache["sens"] = _scores(model, importance, ignored_names, calibration,
                                                                trace_imgsz, cost_aware, allocation, imgsz,
                                                                latency_cache)
        cache["achieved"] = {}
    scores, loss, sens = cache["scores"], cache["loss"], cache["sens"]
    total = sum(len(v) for v in scores.values())

    if "graph" not in cache:  # the weights a plan leaves are counted on the groups, not on a pruned copy
        mods = dict(model.named_modules())
        cache["graph"] = _build_groups(model, [mods[n] for n in ignored_names], trace_imgsz)
    dg, groups = cache["graph"]

    def trial(k: int) -> tuple[float, dict]:
        plan = _plan(scores, k, round_to, max_layer_ratio, round_share)
        if k not in cache["achieved"]:
            left = plan_weights(model, groups, dg, plan, scope)
            if left is None:  # not countable on the groups: prune a copy
                m = copy.deepcopy(model)
                _apply_plan(m, plan, ignored_names, trace_imgsz)
                left = _weights(m, scope)
            cache["achieved"][k] = 1 - left / w_before
        return cache["achieved"][k], plan

    lo, hi = 0, total
    best: tuple[float, int, dict] = (math.inf, 0, {})
    while lo <= hi:
        k = (lo + hi) // 2
        got, plan = trial(k)
        if abs(got - amount) < abs(best[0] - amount):
            best = (got, k, plan)
        if abs(got - amount) <= tolerance / 4:
            break
        lo, hi = (k + 1, hi) if got < amount else (lo, k - 1)
    return (*best, scores, loss, sens, total)


def _checked_plan(model: nn.Module, plan: Mapping[str, Sequence[int]], ignored_names: list,
                  trace_imgsz: int) -> dict:
    """``plan`` as ``{group root: sorted channel indices}``, after checking it fits ``model``'s groups."""
    _, groups = _build_groups(model, [dict(model.named_modules())[n] for n in ignored_names], trace_imgsz)
    sizes = {name: len(g[0].idxs) for name, g in groups}
    out = {}
    for name, idxs in plan.items():
        if name not in sizes:
            raise PruneError(f"channel plan: {name!r} is not a prunable channel group of this model (groups: "
                             f"{', '.join(list(sizes)[:5])}, ...)")
        idxs = sorted({int(i) for i in idxs})
        if idxs and (idxs[0] < 0 or idxs[-1] >= sizes[name] or len(idxs) >= sizes[name]):
            raise PruneError(f"channel plan: {name!r} has {sizes[name]} channels; cannot remove {len(idxs)} "
                             f"(indices {idxs[0]}..{idxs[-1]})")
        if idxs:
            out[name] = idxs
    return out


def channel_prune(model: nn.Module, amount: float, *, importance: Optional[str] = None,
                  round_to: int = DEFAULT_ROUND_TO, include: Sequence[str] = (), exclude: Sequence[str] = (),
                  calibration: Any = None, max_layer_ratio: float = DEFAULT_MAX_LAYER_RATIO,
                  imgsz: int = 640, trace_imgsz: int = 64, tolerance: float = AMOUNT_TOLERANCE,
                  cost_aware: float = DEFAULT_COST_AWARE, round_share: float = DEFAULT_ROUND_SHARE,
                  allocation: str = DEFAULT_ALLOCATION, log: bool = True,
                  cache: Optional[dict] = None, plan: Optional[Mapping[str, Sequence[int]]] = None,
                  latency_cache: Optional[Path] = None) -> ChannelPruneResult:
    """Remove whole output channels of ``model`` (a YOLOv5 ``DetectionModel``, in place) with Torch-Pruning.

    ``amount``: fraction of the Conv2d weights in scope to remove (input channels removed from a consumer
    count too), met within ``tolerance`` by bisection of one global importance threshold (ranking across all
    layers; each group's scores normalised by their mean, Torch-Pruning's default). ``include``/``exclude``:
    fnmatch patterns as in :func:`pruning.conv_layers`; only convs in scope lose *output* channels. Detect's
    output convs never do. ``round_to``: kept channel counts are multiples of it (nearest, never 0), or of its
    largest divisor that is at most ``round_share`` of the group's width (:func:`round_step`).
    ``max_layer_ratio``: at most this fraction of a group's channels is removed. ``calibration``: for
    ``importance="taylor"``, ``(images, targets)`` from :func:`load_calibration_batch`. ``importance=None``:
    Taylor when ``calibration`` is given, else L1. ``cost_aware``: exponent ``alpha`` of a FLOP-aware ranking,
    each group's scores divided by ``(MACs one of its channels costs / mean over groups) ** alpha`` (see
    :func:`channel_macs`), so at the same weight ``amount`` cheap-per-FLOP early, high-resolution layers are
    preferred; 0 is the plain ranking. ``allocation``: ``global`` (the importance ranking decides how many
    channels each group loses) or ``sensitivity`` (measured consumer output error on the calibration images
    decides, :mod:`yolo_prune_plugin.prune.channel_sensitivity`; the importance still picks which channels;
    ``calibration`` is ``(images, targets)`` or an image tensor). ``imgsz``: for GFLOPs. The result's ``kept``
    maps each conv that lost channels to the original channel indices it kept. ``cache``: a dict kept across calls
    on copies of the same model with the same settings (a budget search): the channel scores and the fraction each
    number of removed channels achieves do not depend on ``amount``, so they are computed once. ``plan``: the
    channels to remove, fixed beforehand (a result's ``plan``, e.g. the targets ``channel.regularize`` trained
    away): no ranking, no bisection; it must name groups of this model and still reach ``amount``.
    ``allocation: latency``: the scores (sensitivity with images, else the importance) per millisecond a channel
    costs on ONNX Runtime CPU at ``imgsz`` (:mod:`yolo_prune_plugin.prune.latency`; the layer table cached in
    ``latency_cache`` when given).
    Raises :class:`ConfigError` for bad arguments, :class:`PruneError` when the amount cannot be met.
    """
    t0 = time.perf_counter()
    if importance is None:
        importance = DEFAULT_IMPORTANCE if calibration is not None else FALLBACK_IMPORTANCE
    if not (isinstance(amount, (int, float)) and 0.0 < amount < 1.0):
        raise ConfigError(f"amount: expected a number in (0, 1), got {amount!r}")
    if importance not in IMPORTANCES:
        raise ConfigError(f"importance {importance!r} is unknown; expected one of {', '.join(IMPORTANCES)}")
    if not (isinstance(round_to, int) and not isinstance(round_to, bool) and round_to >= 1):
        raise ConfigError(f"round_to: expected an integer >= 1, got {round_to!r}")
    if not (isinstance(cost_aware, (int, float)) and not isinstance(cost_aware, bool) and 0.0 <= cost_aware <= 4.0):
        raise ConfigError(f"cost_aware: expected a number in [0, 4] (exponent of the FLOP cost), got {cost_aware!r}")
    if not (isinstance(round_share, (int, float)) and not isinstance(round_share, bool) and 0.0 < round_share <= 1.0):
        raise ConfigError(f"round_share: expected a number in (0, 1] (largest rounding step as a share of a layer's "
                          f"width), got {round_share!r}")
    if allocation not in CHANNEL_ALLOCATIONS:
        raise ConfigError(f"allocation {allocation!r} is unknown; expected one of {', '.join(CHANNEL_ALLOCATIONS)}")
    if allocation == "sensitivity" and calibration is None:
        raise ConfigError("allocation 'sensitivity' needs calibration images (train split)")
    if not (0.0 < max_layer_ratio <= 1.0):
        raise ConfigError(f"max_layer_ratio: expected a number in (0, 1], got {max_layer_ratio!r}")
    det = getattr(model, "model", None)
    if not (isinstance(det, nn.Sequential) and type(det[-1]).__name__ == "Detect"):
        raise ConfigError("channel pruning needs a YOLOv5 DetectionModel (last module Detect)")
    scope = [n for n, _ in check_scope(model, include, exclude)]
    detect_convs = detect_output_convs(model)
    names = {m: n for n, m in model.named_modules()}
    in_scope = set(scope)
    ignored_names = [n for n, m in conv_layers(model) if n not in in_scope or m in detect_convs]
    ignored_names = list(dict.fromkeys(ignored_names + [names[m] for m in detect_convs]))

    params_before, gflops_before = count_parameters(model), gflops(model, imgsz)
    channels_before = channel_counts(model)
    w_before = _weights(model, scope)

    was_training = model.training
    model.eval()
    if plan is not None:
        importance, allocation = "plan", "plan"  # the report says what decided: nothing was ranked
        plan, k, total = _checked_plan(model, plan, ignored_names, trace_imgsz), 0, 1
        achieved, scores, loss, sens = None, plan, None, None  # measured on the tagged copy below
    else:
        achieved, k, plan, scores, loss, sens, total = _search(
            model, amount, scope, w_before, ignored_names, importance, calibration, trace_imgsz, cost_aware,
            allocation, round_to, max_layer_ratio, round_share, tolerance, cache, imgsz, latency_cache)
    q = k / total
    tagged = copy.deepcopy(model)  # BN running means := channel ids, to learn which channels each conv kept
    for mod in tagged.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.arange(mod.num_features, dtype=mod.running_mean.dtype))
    _apply_plan(tagged, plan, ignored_names, trace_imgsz)
    if achieved is None:
        achieved = 1 - _weights(tagged, scope) / w_before
    if abs(achieved - amount) > tolerance:  # before the model itself is touched
        raise PruneError(f"channel pruning: cannot remove {amount:.1%} of the Conv2d weights in scope "
                         f"(closest {achieved:.1%} with round_to={round_to}, max_layer_ratio={max_layer_ratio}); "
                         "lower round_to or raise max_layer_ratio")
    kept = {}
    tmods = dict(tagged.named_modules())
    for n, m in conv_layers(tagged):
        bn = tmods.get(n.rsplit(".", 1)[0] + ".bn")
        if m.out_channels != channels_before[n][0] and isinstance(bn, nn.BatchNorm2d):
            kept[n] = bn.running_mean.round().long().tolist()
    del tagged
    _apply_plan(model, plan, ignored_names, trace_imgsz)
    model.train(was_training)
    for n, m in conv_layers(model):
        if m.out_channels < 1 or m.in_channels < 1:
            raise PruneError(f"channel pruning left {n} with no channels")
    w_after = _weights(model, scope)
    res = ChannelPruneResult(importance, float(amount), 1 - w_after / w_before, round_to, params_before,
                             count_parameters(model), gflops_before, gflops(model, imgsz), w_before, w_after,
                             channels_before, channel_counts(model), q, time.perf_counter() - t0,
                             {"max_layer_ratio": max_layer_ratio, "round_share": float(round_share), "allocation": allocation,
                              "cost_aware": float(cost_aware), "groups": len(scores),
                              "groups_pruned": len(plan)}, kept, {n: list(v) for n, v in plan.items()})
    if sens:
        res.extra.update(sens)
    if loss is not None:
        res.extra["calibration_loss"] = round(loss, 4)
        res.extra["calibration_images"] = int(len(calibration[0]))
    if log:
        LOGGER.info(res.log_line())
    return res


def is_structurally_pruned(model: nn.Module) -> bool:
    """True when some Conv2d has fewer channels than the model's own YAML builds (see backend.training_loop.is_channel_pruned)."""
    from ..backend.loading import get_backend
    from ..backend.training_loop import is_channel_pruned

    return is_channel_pruned(model, get_backend())
