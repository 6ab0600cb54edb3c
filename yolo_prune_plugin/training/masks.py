"""Exact zeros inside YOLOv5's training loop: masks, the optimizer hooks that keep them, and leak counts.

How zeros are kept exact without pruning re-parametrisation: callbacks never see the optimizer or the EMA, so
at ``on_train_start`` they are read from ``train()``'s frame (:func:`~yolo_prune_plugin.backend.training_loop.
training_objects`, nothing of YOLOv5 is patched). A step pre-hook on the optimizer zeroes the gradients of
masked weights and a step post-hook zeroes the weights (GradScaler calls ``optimizer.step``, so both fire;
a skipped AMP step changes nothing). With weight and gradient zero, SGD (momentum, nesterov, weight decay),
Adam and AdamW leave the weight at zero, and the EMA (``d * ema + (1 - d) * model``) stays zero once zeroed.
When masks grow, the new positions are also zeroed in the EMA and in the optimizer state (momentum, Adam
moments). Hooks live on the optimizer, so checkpoints (deep copies of model and EMA) carry no hooks, no
``weight_orig``/``weight_mask`` and load in plain YOLOv5. One side effect: ``clip_grad_norm_`` runs before
the step, so masked gradients still count toward YOLOv5's clipping norm (max 10).

"Zero leakage" is counted (non-zero values at pruned positions) in the live model and EMA after every epoch,
in ``last.pt`` (model and EMA) after every save, in the final ``last.pt``/``best.pt`` and in the written
``best_pruned.pt``; the counts go in the report and any leak raises :class:`PruneError`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ..backend.loading import Backend, load_checkpoint
from ..backend.training_loop import training_objects
from ..errors import PruneError
from ..prune.unstructured import conv_layers

LOGGER = logging.getLogger("yolo_prune_plugin")


Masks = dict[str, torch.Tensor]  # Conv2d module name -> bool tensor, True where the weight is pruned


# ---------------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------------
def zero_masks(model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Masks:
    """``weight == 0`` of every Conv2d in scope, keyed by module name (on the CPU)."""
    return {n: (m.weight.detach() == 0).cpu() for n, m in conv_layers(model, include, exclude)}


def count_leaks(model: nn.Module, masks: Masks) -> int:
    """How many masked positions of ``model`` hold a non-zero value (0 = no leak)."""
    modules = dict(model.named_modules())
    total = 0
    for name, mask in masks.items():
        m = modules.get(name)
        if m is None or getattr(m, "weight", None) is None or m.weight.shape != mask.shape:
            raise PruneError(f"mask for {name!r} does not fit the model (missing module or other shape)")
        total += int(torch.count_nonzero(m.weight.detach().masked_fill(~mask.to(m.weight.device), 0)))
    return total


def count_masked(masks: Masks) -> int:
    return int(sum(int(m.sum()) for m in masks.values()))


def file_leaks(path: str | Path, masks: Masks, backend: Optional[Backend] = None) -> dict[str, int]:
    """Leak counts of the ``model`` and ``ema`` entries of a checkpoint file."""
    ckpt = load_checkpoint(path, backend)
    return {k: count_leaks(ckpt[k], masks) for k in ("model", "ema") if isinstance(ckpt.get(k), nn.Module)}


class MaskKeeper:
    """Keeps masked Conv2d weights of YOLOv5's live model exactly zero (model, optimizer state, EMA).

    Call :meth:`capture` at ``on_train_start``: the model, optimizer and EMA are read from YOLOv5's ``train()``
    frame (:func:`~yolo_prune_plugin.backend.training_loop.training_objects`; no YOLOv5 name is patched). ``initial`` decides
    the masks set then: a :data:`Masks` dict, or ``"zeros"`` (the live model's zeros in scope), or None (no mask
    until :meth:`set_masks`). ``warmup=False`` replaces YOLOv5's lr/momentum warmup by the scheduled values.
    Call :meth:`remove_hooks` when training ends.
    """

    def __init__(self, backend: Backend, include: Sequence[str] = (), exclude: Sequence[str] = (),
                 initial: Masks | str | None = None, warmup: bool = True):
        self.backend = backend
        self.include, self.exclude = tuple(include), tuple(exclude)
        self.initial = initial
        self.warmup = warmup
        self.model: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.ema: Any = None
        self.start_epoch = 0
        self.resumed = False
        self.masks: Masks = {}
        self._params: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, pruned mask on its device)
        self._handles: list[Any] = []
        self._base_momentum: list[Optional[float]] = []
        self._scheduled_lr: Optional[list[float]] = None
        self.epoch_steps = 0  # optimizer steps since the last epoch start, and the lrs they used (min, max)
        self.epoch_lr: Optional[tuple[float, float]] = None

    def capture(self) -> None:
        """Take YOLOv5's training objects (from ``on_train_start``) and hook the optimizer's steps."""
        objs = training_objects(self.backend)
        model, optimizer = objs.model, objs.optimizer
        self.model, self.optimizer, self.ema = model, optimizer, objs.ema
        self.start_epoch, self.resumed = objs.start_epoch, objs.resumed
        self._base_momentum = [g.get("momentum") for g in optimizer.param_groups]
        self._handles = [optimizer.register_step_pre_hook(self._pre_step),
                         optimizer.register_step_post_hook(self._post_step)]
        if isinstance(self.initial, str):
            self.set_masks(zero_masks(model, self.include, self.exclude))
        elif self.initial:
            leaks = count_leaks(model, self.initial)
            if leaks:
                raise PruneError(f"the model YOLOv5 built for training has {leaks} non-zero weights where the "
                                 "pruned checkpoint has zeros (did --cfg or the class count change the model?)")
            self.set_masks(self.initial)

    @property
    def captured(self) -> bool:
        return self.model is not None and self.optimizer is not None

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- masks --------------------------------------------------------------------------------------
    def set_masks(self, masks: Masks) -> None:
        """Hold ``masks`` from now on: zero those positions in the model, the EMA and the optimizer state."""
        assert self.model is not None and self.optimizer is not None
        modules = dict(self.model.named_modules())
        ema_modules = dict(self.ema.ema.named_modules()) if self.ema is not None else {}
        params = []
        with torch.no_grad():
            for name, mask in masks.items():
                w = modules[name].weight
                dev_mask = mask.to(w.device)
                w.masked_fill_(dev_mask, 0)
                params.append((w, dev_mask))
                state = self.optimizer.state.get(w, {})
                for v in state.values():
                    if torch.is_tensor(v) and v.shape == w.shape:
                        v.masked_fill_(dev_mask, 0)
                if name in ema_modules:
                    ew = ema_modules[name].weight
                    ew.masked_fill_(mask.to(ew.device), 0)
        self.masks = {n: m.clone() for n, m in masks.items()}
        self._params = params

    def leaks(self) -> dict[str, int]:
        """Leak counts of the live model and EMA."""
        out = {"model": count_leaks(self.model, self.masks)} if self.model is not None else {}
        if self.ema is not None:
            out["ema"] = count_leaks(self.ema.ema, self.masks)
        return out

    # -- optimizer hooks ----------------------------------------------------------------------------
    def epoch_start(self) -> None:
        """Call at ``on_train_epoch_start``: the param groups hold the scheduler's lr for this epoch."""
        if self.optimizer is not None:
            self._scheduled_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.epoch_steps, self.epoch_lr = 0, None

    def batch_end(self) -> None:
        """Call at ``on_train_batch_end``: undo the warmup values left by a batch that did not step (logs)."""
        if self.optimizer is not None:
            self._restore_lr(self.optimizer)

    def _restore_lr(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.warmup and self._scheduled_lr is not None:
            for g, lr, mom in zip(optimizer.param_groups, self._scheduled_lr, self._base_momentum):
                g["lr"] = lr
                if mom is not None and "momentum" in g:
                    g["momentum"] = mom

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p, mask in self._params:
            if p.grad is not None:
                p.grad.masked_fill_(mask, 0)
        self._restore_lr(optimizer)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        lrs = [float(g["lr"]) for g in optimizer.param_groups]
        lo, hi = self.epoch_lr or (min(lrs), max(lrs))
        self.epoch_steps, self.epoch_lr = self.epoch_steps + 1, (min(lo, *lrs), max(hi, *lrs))
        with torch.no_grad():
            for p, mask in self._params:
                p.masked_fill_(mask, 0)
