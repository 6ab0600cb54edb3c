"""Prunable channels trained in (``channel.regularize``): a targeted sparsity penalty inside YOLOv5's own loop.

From epoch ``from_epoch`` of the user's training run, the channels that one-shot channel pruning of the current
model would remove (:func:`yolo_prune_plugin.prune.channel.channel_prune` on a copy, L1 importance, the run's
amount and channel options; chosen once, at the start of that epoch: the *plan*) get an L1 penalty
``weight * sum (|gamma| + |beta|)`` on their BatchNorm scales and shifts: an optimizer step pre-hook
(:func:`~yolo_prune_plugin.backend.training_loop.add_gradient_hook`) adds ``weight * sign(.)`` to exactly those
gradient entries. Network slimming penalises ``gamma`` alone, which leaves each channel a constant
``SiLU(beta)``; removing a constant is exact only where the consumer's bias can absorb it, not at the zero-padded
borders of a 3x3 consumer (tests/test_channel_regularize.py: removal is exact only with both at zero), so the
shift goes to zero too and the channel's output becomes 0. Nothing else's gradient changes.
The train-end prune removes exactly the plan (:attr:`ChannelRegularizer.plan`, ``channel_prune(plan=...)``). The
penalty value is logged per epoch into the report history (and from there to TensorBoard as
``prune/history/regularize_penalty``).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from ..backend.loading import Backend
from ..backend.training_loop import add_gradient_hook, training_objects
from ..config import PruneConfig

LOGGER = logging.getLogger("yolo_prune_plugin")


def regularize_targets(model: nn.Module, config: PruneConfig,
                       plan: Optional[dict] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """``({BatchNorm name: channel indices}, plan)``: the channels that channel pruning of ``model`` at
    ``config.amount`` would remove (or that ``plan``, a :attr:`ChannelPruneResult.plan`, removes: every member of
    each group, not only its root), and that pruning's plan."""
    from ..prune.channel import channel_prune

    ch = config.channel
    m = copy.deepcopy(model).float().eval()
    res = channel_prune(m, config.amount or 0.0, importance="l1", round_to=ch.round_to, include=config.include,
                        exclude=config.exclude, max_layer_ratio=ch.max_layer_ratio, cost_aware=ch.cost_aware,
                        round_share=ch.round_share, log=False, plan=plan)
    mods = dict(model.named_modules())
    out = {}
    for conv, kept in res.kept.items():
        bn = conv.rsplit(".", 1)[0] + ".bn"
        if isinstance(mods.get(bn), nn.BatchNorm2d):
            gone = sorted(set(range(mods[bn].num_features)) - set(kept))
            if gone:
                out[bn] = torch.tensor(gone, dtype=torch.long)
    return out, res.plan


class ChannelRegularizer:
    """The penalty's life in one training run: targets at ``from_epoch``, the gradient hook, per-epoch values."""

    def __init__(self, config: PruneConfig, backend: Optional[Backend] = None, plan: Optional[dict] = None,
                 weight: Optional[float] = None) -> None:
        """``plan``: train exactly these channels away from the first epoch (prune-aware fine-tuning of a finished
        checkpoint, training/recovery.py) instead of choosing them at ``channel.regularize.from_epoch``;
        ``weight``: the penalty's lambda (default ``channel.regularize.weight``)."""
        from ..prune.registry import ChannelRegularize

        self.config = config
        reg = config.channel.regularize or ChannelRegularize()
        self.reg = reg if plan is None and weight is None else \
            ChannelRegularize(weight=reg.weight if weight is None else weight, from_epoch=0)
        self.fixed_plan = plan  # a fixed plan is also faded to exactly zero by the end of the run (batch_end)
        self.ema: Any = None
        self.batches: Optional[int] = None  # batches in the run (the fade's length)
        self.batch = 0
        self.backend = backend
        self.model: Optional[nn.Module] = None
        self.optimizer: Any = None
        self.epoch = 0
        self.targets: dict[str, torch.Tensor] = {}
        self.plan: Optional[dict] = None  # group root -> channels removed: what the train-end prune removes
        self.history: list[dict] = []
        self.best_epoch: Optional[int] = None  # the epoch whose state YOLOv5 saved as best.pt
        self._handle: Any = None

    def train_start(self) -> None:
        """``on_train_start``: YOLOv5's model and optimizer, read from its ``train()``."""
        objs = training_objects(self.backend)
        self.attach(objs.model, objs.optimizer, objs.start_epoch)
        self.ema, self.batches = objs.ema, objs.batches

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, start_epoch: int = 0) -> None:
        self.model, self.optimizer, self.epoch = model, optimizer, int(start_epoch) - 1

    def epoch_start(self) -> None:
        """``on_train_epoch_start``: from ``from_epoch`` on, choose the targets once and hook the optimizer."""
        self.epoch += 1
        if self.epoch < self.reg.from_epoch or self._handle is not None or self.model is None:
            return
        self.targets, self.plan = regularize_targets(self.model, self.config, self.fixed_plan)
        self._handle = add_gradient_hook(self.optimizer, self.add_gradients)
        LOGGER.info("channel.regularize: L1 %.3g on the BatchNorm scales and shifts of %d channels in %d layers from epoch %d",
                    self.reg.weight, sum(len(v) for v in self.targets.values()), len(self.targets), self.epoch)

    @torch.no_grad()
    def batch_end(self) -> None:
        """``on_train_batch_end`` (after the optimizer step and the EMA update), with a fixed plan: the targeted
        scales and shifts of the model and of its EMA are scaled so that they follow ``1 - b / B`` (batch ``b`` of
        the run's ``B``) and are exactly 0 after the last batch: the plan is trained away however far the penalty
        got, gradually, while the rest of the network adapts (removal is then lossless)."""
        if self.fixed_plan is None or not self.targets or not self.batches:
            return
        self.batch += 1
        prev = max(0.0, 1.0 - (self.batch - 1) / self.batches)
        now = max(0.0, 1.0 - self.batch / self.batches)
        ratio = now / prev if prev > 0 else 0.0
        models = [self.model] + ([self.ema.ema] if getattr(self.ema, "ema", None) is not None else [])
        for m in models:
            for p, idx in self._parameters(m):
                p.data[idx] = p.data[idx] * ratio

    def _parameters(self, model: Optional[nn.Module] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(parameter, targeted indices)``: the BatchNorm scale and shift of every targeted layer."""
        mods = dict((model or self.model).named_modules())
        return [(p, idx.to(p.device)) for name, idx in self.targets.items()
                for p in (mods[name].weight, mods[name].bias)]

    @torch.no_grad()
    def add_gradients(self) -> None:
        """``weight * sign(.)`` added to the targeted BatchNorm scales' and shifts' gradients (nothing else)."""
        for p, idx in self._parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.index_add_(0, idx, self.reg.weight * torch.sign(p.detach()[idx]))

    @torch.no_grad()
    def penalty(self) -> float:
        """``weight * sum (|gamma| + |beta|)`` over the targeted channels."""
        return float(self.reg.weight * sum(p.detach()[idx].abs().sum() for p, idx in self._parameters()))

    def fit_epoch_end(self, epoch: int) -> None:
        """``on_fit_epoch_end``: the epoch's penalty into the history."""
        if self.targets:
            self.history.append({"epoch": int(epoch), "regularize_penalty": round(self.penalty(), 6),
                                 "regularize_channels": int(sum(len(v) for v in self.targets.values()))})

    def model_save(self, epoch: int, best_fitness: Any, fi: Any) -> None:
        """``on_model_save``: YOLOv5 wrote ``best.pt`` this epoch when ``fi == best_fitness``."""
        if np.asarray(fi, dtype=float).ravel()[0] == np.asarray(best_fitness, dtype=float).ravel()[0]:
            self.best_epoch = int(epoch)

    def best_before_penalty(self) -> bool:
        """``best.pt`` was saved before the penalty's first epoch (it carries none of the regularisation)."""
        return self.best_epoch is not None and bool(self.history) and self.best_epoch < self.history[0]["epoch"]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
