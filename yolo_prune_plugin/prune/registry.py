"""The pruning methods by name: what each ranks (importance) and over which scope, and its options.

A method is a pair in the manner of Torch-Pruning's ``importance=`` + ``global_pruning=``: ``scope`` is
``global`` (one threshold over every Conv2d weight in scope) or ``layer`` (``amount`` of every layer);
``importance`` names the score (``l1``, ``lamp``, ``obs``). The implementations are bound to the importance
names in :mod:`yolo_prune_plugin.prune.unstructured`; this module stays free of torch so the config can validate
method names and options without importing anything heavy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

__all__ = ["MethodSpec", "ObsOptions", "OBS_ALLOCATIONS", "STRUCTURES", "CHANNEL_IMPORTANCES",
           "DATA_AWARE_CHANNEL_IMPORTANCES", "CHANNEL_ALLOCATIONS", "ChannelOptions", "ChannelRegularize", "METHODS", "method_names", "data_aware_names", "get_method"]


#: per-layer count allocations of ``obs`` (see :func:`yolo_prune_plugin.prune.allocation.layer_counts`)
OBS_ALLOCATIONS = ("global", "lamp", "uniform", "hessian")


@dataclass(frozen=True)
class ObsOptions:
    """Knobs of the ``obs`` importance (defaults: the best measured, see :mod:`yolo_prune_plugin.prune.obs`)."""

    blocksize: int = 128  # columns per lazy OBS update block (speed only when mask_block == 0)
    mask_block: Optional[int] = 0  # columns per mask-selection block (0: whole layer; None: = blocksize)
    damp: float = 0.01  # dampening, fraction of the mean Hessian diagonal added to the diagonal
    allocation: str = "global"  # per-layer counts: "global" (magnitude), "lamp", "uniform" or "hessian"
    protect: tuple[str, ...] = ()  # fnmatch patterns of layers left dense (their share goes to the others)
    flip: bool = True  # also calibrate on the horizontally flipped images (twice the data, same images)
    batch_size: int = 8  # images per im2col chunk when accumulating a layer's Hessian (bounds memory)
    samples_per_column: int = 256  # cap on im2col rows per Hessian column (0: all): cheaper high-resolution layers
    steps: int = 2  # OBS passes reaching the amount gradually (linear ramp); each re-calibrates on the pruned model


@dataclass(frozen=True)
class MethodSpec:
    """One selectable ``method``."""

    name: str
    scope: str  # "global" | "layer"
    importance: str  # "l1" | "lamp" | "obs"
    data_aware: bool = False  # needs calibration images from the train split
    options: Optional[type] = None  # dataclass of the importance's options (config key = importance name)
    summary: str = ""


METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("global", "global", "l1", summary="|W|, one threshold over every Conv2d weight in scope"),
    MethodSpec("layerwise", "layer", "l1", summary="|W| per layer, amount of every layer (YOLOv5's prune())"),
    MethodSpec("lamp", "global", "lamp", summary="LAMP scores (Lee et al. 2021), one global threshold"),
    MethodSpec("obs", "global", "obs", data_aware=True, options=ObsOptions,
               summary="SparseGPT-style OBS with reconstruction, calibrated on train-split images"),
)}


#: ``structure`` values: zeros inside dense tensors (default), or whole output channels removed (smaller, faster)
STRUCTURES = ("unstructured", "channel")
#: channel importances of ``structure: channel`` (Torch-Pruning's criteria); the data-aware ones need labelled
#: train-split images (YOLOv5's own loss)
#: (``obs``: structured OBS on the consumers' input statistics, prune/channel_sensitivity.py; images only)
CHANNEL_IMPORTANCES = ("l1", "l2", "bn", "lamp", "taylor", "obs")
DATA_AWARE_CHANNEL_IMPORTANCES = ("taylor", "obs")
#: how many channels each group loses: the importance ranking across groups, measured consumer output error, or
#: that error per millisecond a channel costs on ONNX Runtime (prune/latency.py)
CHANNEL_ALLOCATIONS = ("global", "sensitivity", "latency")


@dataclass(frozen=True)
class ChannelRegularize:
    """``channel.regularize``: L1 on the BatchNorm scales and shifts of the channels a channel prune would remove
    (network slimming, targeted, with the shift so that the channel's output goes to 0), added to their gradients
    from epoch ``from_epoch`` of the user's own training run; the train-end prune removes exactly those channels."""

    weight: float = 0.5  # lambda of lambda * sum (|gamma| + |beta|) over the targeted channels (measured: corn-pest)
    from_epoch: int = 0  # first epoch (0-based) with the penalty; the targets are chosen at its start
    # the penalty's largest cost: an epoch whose val mAP50-95 is more than this below the best before the penalty
    # halves lambda (floor: weight / 64); an epoch within half of it whose penalty fell < 10 % raises lambda by 1.5x
    # (cap: 4 x weight); null = a fixed lambda
    max_drop: Optional[float] = 0.02


@dataclass(frozen=True)
class ChannelOptions:
    """Options of ``structure: channel`` (defaults chosen by scripts/benchmark_structured.py)."""

    importance: Optional[str] = None  # None: taylor when the run has data (train split with labels), else l1
    round_to: int = 8  # kept channel counts are multiples of it (nearest, never 0) ...
    round_share: float = 0.125  # ... or of its largest divisor <= this share of the layer's width (narrow layers)
    max_layer_ratio: float = 0.75  # at most this fraction of a layer group's channels is removed
    # None: "sensitivity" (measured consumer error) when the run has train-split data, else "global" (importance
    # ranking); measured: sensitivity >= global in 12 of 12 held-out cells (3 splits x 2 amounts x 2 seeds)
    allocation: Optional[str] = None
    # None: on when the run has train-split data, else off (measured: held-out retention x4-x8 on coco128 splits)
    reconstruct: Optional[bool] = None  # refit layers whose inputs lost channels to the dense outputs (needs data)
    compensate: bool = False  # removed channels' mean into the consumer's bias / BN shift (needs data)
    regularize: Optional[ChannelRegularize] = None  # group-sparsity penalty during training (train / train end)
    cost_aware: float = 0.0  # > 0: rank by importance / (MACs per channel)^alpha (faster, less accurate one-shot)

    def resolved(self, has_data: bool, speed_budget: bool = False) -> "ChannelOptions":
        """The options with the data-dependent defaults (``reconstruct``, ``allocation``: None) decided for a run
        with / without data; ``speed_budget``: a ``target.min_speedup`` on ONNX Runtime, which makes ``latency`` the
        default allocation (measured: docs/benchmarks.md, issue 25)."""
        default = "latency" if speed_budget else "sensitivity" if has_data else "global"
        return dataclasses.replace(
            self, reconstruct=has_data if self.reconstruct is None else self.reconstruct,
            allocation=default if self.allocation is None else self.allocation)


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def data_aware_names() -> tuple[str, ...]:
    return tuple(n for n, m in METHODS.items() if m.data_aware)


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {name!r}") from None
