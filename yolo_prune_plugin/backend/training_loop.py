"""What the plugin reads from (and swaps in) YOLOv5's running ``train()``.

Callbacks never see the optimizer or the EMA: :func:`training_objects` reads them from ``train()``'s frame;
:func:`replace_optimizer_params` swaps pruned tensors into the optimizer; :func:`keep_checkpoint_architecture`
makes YOLOv5 train a channel-pruned architecture instead of rebuilding it from its YAML.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import inspect
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError, PruneError
from .loading import Backend, get_backend, is_detection_model, load_checkpoint
from .patches import replaced

LOGGER = logging.getLogger("yolo_prune_plugin")


# --------------------------------------------------------------------------------------------------
# YOLOv5's train options, never from the host process's command line
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _argv(args: Sequence[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = ["train.py", *args]
    try:
        yield
    finally:
        sys.argv = saved


def train_opt(args: Optional[Sequence[str]] = None, backend: Optional[Backend] = None,
              **kwargs: Any) -> argparse.Namespace:
    """YOLOv5's train options from command-line ``args`` (strict: unknown flags are an error) and ``kwargs``.

    ``train.parse_opt`` reads ``sys.argv``: it is set to ``args`` alone while it parses, so the host process's own
    flags (a user script run with ``-h``) never reach it.
    """
    backend = backend or get_backend()
    with _argv(list(args or [])):
        opt = backend.train.parse_opt(False)
    for k, v in kwargs.items():
        if not hasattr(opt, k):
            raise ConfigError(f"train: unknown YOLOv5 train option {k!r}")
        setattr(opt, k, v)
    return opt


# --------------------------------------------------------------------------------------------------
# Training objects: read from YOLOv5's train() frame, nothing patched
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainingObjects:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: Any  # ModelEMA or None (DDP ranks > 0)
    start_epoch: int
    resumed: bool
    imgsz: Optional[int] = None  # train()'s checked image size
    batches: Optional[int] = None  # batches this run will train: nb x (epochs - start_epoch)


def _yolov5_train_frame(*names: str) -> Any:
    """The frame of the YOLOv5 ``train()`` whose callback is running now: the nearest caller named ``train``
    whose locals include ``names``; None outside one."""
    frame = inspect.currentframe()
    try:
        f = frame.f_back if frame is not None else None
        while f is not None:
            if f.f_code.co_name == "train" and all(n in f.f_locals for n in names):
                return f
            f = f.f_back
    finally:
        del frame
    return None


def _train_frame() -> Any:
    """The frame of the YOLOv5 ``train()`` whose callback is running now (PruneError outside one)."""
    f = _yolov5_train_frame("optimizer", "ema")
    if f is None:
        raise PruneError("could not find YOLOv5's train() objects (model, optimizer, EMA) from the callback; the "
                         "recovery modes need YOLOv5 7.0.x's train.py")
    return f


def running_train_opt() -> Any:
    """The ``opt`` of the YOLOv5 ``train()`` whose callback is running now (from ``on_pretrain_routine_start``
    on), None outside one."""
    f = _yolov5_train_frame("opt", "hyp")
    return f.f_locals["opt"] if f is not None else None


def training_objects(backend: Backend) -> TrainingObjects:
    """The live model, optimizer and EMA of the YOLOv5 ``train()`` whose callback is running now.

    Call from ``on_train_start`` (or later): ``train()`` has built them by then. Read from its frame's locals,
    so no YOLOv5 name is patched. Raises :class:`PruneError` when not called inside YOLOv5 7.0.x's ``train()``.
    """
    loc = _train_frame().f_locals
    model = loc["model"]
    model = getattr(model, "module", model)  # DDP
    start = int(loc.get("start_epoch", 0))
    nb, epochs = loc.get("nb"), loc.get("epochs")
    batches = int(nb) * (int(epochs) - start) if isinstance(nb, int) and isinstance(epochs, int) else None
    return TrainingObjects(model, loc["optimizer"], loc["ema"], start, bool(loc.get("resume")) or start > 0,
                           loc.get("imgsz") if isinstance(loc.get("imgsz"), int) else None, batches)


def _set_train_locals(frame: Any, **values: Any) -> None:
    """Assign local variables of YOLOv5's suspended ``train()`` frame (CPython: write-through ``f_locals`` from
    3.13, ``PyFrame_LocalsToFast`` before); read back, PruneError when the write did not take."""
    if sys.version_info >= (3, 13):
        for k, v in values.items():
            frame.f_locals[k] = v
    else:
        loc = frame.f_locals
        loc.update(values)
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
    now = frame.f_locals
    if any(now.get(k) != v for k, v in values.items()):
        raise PruneError(f"could not set {', '.join(values)} in YOLOv5's train(); set finetune.warmup: true to "
                         "train with YOLOv5's own warm-up and accumulation")


def steady_training_loop() -> dict[str, Any]:
    """From ``on_train_start``: train at the scheduled lr with one optimizer step per batch from the first batch.

    YOLOv5's ``train()`` warms up for ``nw = max(round(warmup_epochs * nb), 100)`` iterations (lr from 0 and the
    bias lr from ``warmup_bias_lr``, momentum from ``warmup_momentum``, ``accumulate`` ramped from 1 to
    ``64 / batch_size``) and then steps once per ``accumulate`` batches; for a short fine-tune that is most of the
    run, with few optimizer steps and EMA updates. Here ``nw = -1`` (the warm-up branch never runs: lr and momentum
    are the scheduler's and hyp's) and ``accumulate = 1``; the per-step weight decay (YOLOv5 scales it by
    ``batch_size * accumulate / 64``) is divided by the ``accumulate`` it replaces, so decay per image is YOLOv5's.
    ``ComputeLoss`` sums over the batch, so the step per image is unchanged too. The EMA (updated after every
    step, decay ``0.9999 * (1 - exp(-updates / 2000))``) then follows the model from the first batch. Nothing of
    YOLOv5 is patched: two locals of the running ``train()`` are set once (every DDP rank runs this hook).
    Returns what was replaced.
    """
    frame = _train_frame()
    try:
        loc = frame.f_locals
        accumulate, nw, optimizer = int(loc["accumulate"]), int(loc["nw"]), loc["optimizer"]
        _set_train_locals(frame, nw=-1, accumulate=1)
    finally:
        del frame
    for g in optimizer.param_groups:
        if g.get("weight_decay"):
            g["weight_decay"] /= accumulate
    return {"warmup_iterations": 0, "accumulate": 1, "yolov5_warmup_iterations": nw, "yolov5_accumulate": accumulate}


def replace_optimizer_params(optimizer: torch.optim.Optimizer, replaced: Mapping[int, torch.Tensor]) -> int:
    """Swap stale parameters in YOLOv5's optimizer for the tensors that replaced them; returns how many.

    ``replaced``: ``id(old parameter) -> new parameter`` (Torch-Pruning assigns a new ``nn.Parameter`` to every
    pruned ``weight``/``bias``). ``smart_optimizer`` builds three param groups (0: biases, 1: Conv weights with
    weight decay, 2: BatchNorm weights without); each new tensor takes the old one's place in its group, so its lr,
    momentum and decay stay YOLOv5's. The old tensor's optimizer state (SGD momentum buffer, Adam moments) is
    dropped: its shape changed, the next step starts it afresh. Other parameters keep their state.
    """
    n = 0
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            new = replaced.get(id(p))
            if new is not None:
                optimizer.state.pop(p, None)
                params[i] = new
                n += 1
    return n


# --------------------------------------------------------------------------------------------------
# Channel-pruned checkpoints in YOLOv5's train.py (structured pruning)
# --------------------------------------------------------------------------------------------------
def _conv_shapes(model: nn.Module) -> dict[str, tuple]:
    det = model.model[-1] if is_detection_model(model) else None
    skip = {id(m) for m in getattr(det, "m", [])}  # Detect's outputs depend on nc/anchors, not on pruning
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and id(m) not in skip}


def is_channel_pruned(model: nn.Module, backend: Optional[Backend] = None) -> bool:
    """True when ``model``'s Conv2d shapes differ from what ``Model(model.yaml)`` builds (channels removed).

    A model without a ``yaml`` dict cannot be compared and counts as not pruned.
    """
    yaml_cfg = getattr(model, "yaml", None)
    if not isinstance(yaml_cfg, dict):
        return False
    b = backend or get_backend()
    ylog = b.general.LOGGER
    level = ylog.level
    ylog.setLevel(logging.WARNING)  # Model() prints its layer table
    try:
        ref = b.yolo.Model(copy.deepcopy(yaml_cfg), ch=3, nc=yaml_cfg.get("nc"))
    finally:
        ylog.setLevel(level)
    return _conv_shapes(ref) != _conv_shapes(model)


@contextlib.contextmanager
def keep_checkpoint_architecture(backend: Backend, weights: str | Path) -> Iterator[nn.Module]:
    """Make YOLOv5's ``train.py`` train the architecture stored in ``weights`` instead of rebuilding its YAML.

    ``train.py`` builds ``Model(cfg or ckpt['model'].yaml)`` and copies only tensors of equal shape
    (``intersect_dicts``): a channel-pruned checkpoint would be silently re-initialised at full width. Inside
    this context ``backend.train.Model`` returns an fp32 copy of the checkpoint's own module (all parameters
    trainable); ``nc`` must match the checkpoint's and custom ``anchors`` are refused (PruneError). The original
    ``Model`` is restored on exit, also on exceptions. Yields the checkpoint model (not the copy).
    """
    src = load_checkpoint(weights, backend)["model"]
    det = src.model[-1]
    wpath = Path(weights)

    def factory(cfg: Any = None, ch: int = 3, nc: Any = None, anchors: Any = None) -> nn.Module:
        if nc is not None and int(nc) != int(det.nc):
            raise PruneError(f"{wpath}: channel-pruned checkpoint has {det.nc} classes but the dataset {nc}; a "
                             "pruned architecture cannot change its class count (prune a model trained on this data)")
        if anchors:
            raise PruneError(f"{wpath}: channel-pruned checkpoint keeps its anchors; remove 'anchors' from hyp")
        if ch != 3:
            raise PruneError(f"{wpath}: channel-pruned checkpoint takes 3 input channels, not {ch}")
        m = copy.deepcopy(src).float()
        for p in m.parameters():
            p.requires_grad_(True)
        LOGGER.info("yolo_prune_plugin: training the channel-pruned architecture of %s (not its YAML)", wpath.name)
        return m

    with replaced(backend.train, "Model", factory):
        yield src


def add_gradient_hook(optimizer: torch.optim.Optimizer, fn: Callable[[], None]) -> Any:
    """Call ``fn()`` before every ``optimizer.step`` of YOLOv5's loop (after backward, after AMP's unscale and
    the gradient clipping), so it can add to the gradients; returns the removable handle."""
    return optimizer.register_step_pre_hook(lambda opt, args, kwargs: fn())
