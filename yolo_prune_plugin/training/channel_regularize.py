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

The strength adapts (``channel.regularize.max_drop``, default 0.02): a fixed lambda tuned on one data set wrecked
another (val mAP50-95 0.647 -> 0.094 in 6 epochs, issue 26). The reference is the best val mAP50-95 YOLOv5 measured
before the penalty began (the first penalised epoch's when it starts at epoch 0); after every epoch whose val
mAP50-95 is more than ``max_drop`` below it lambda halves (not below ``weight / 64``), and after an epoch within half
of it whose L1 sum fell less than 10 % lambda grows 1.5x (not above ``4 x weight``): the penalty backs off when it
costs and pushes when it stalls. The history records lambda and each change.
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


def val_map(log_vals: Any) -> Optional[float]:
    """YOLOv5's val mAP50-95 from ``on_fit_epoch_end``'s ``log_vals`` (3 train losses, P, R, mAP50, mAP50-95, ...)."""
    v = list(log_vals or [])
    return float(v[6]) if len(v) > 6 else None


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
        # a fixed plan (the recipe's penalty phase) keeps a fixed lambda: its fade takes the plan to zero anyway
        self.reg = reg if plan is None and weight is None else \
            ChannelRegularize(weight=reg.weight if weight is None else weight, from_epoch=0, max_drop=None)
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
        self.weight = float(self.reg.weight)  # lambda now (adapted per epoch when reg.max_drop is set)
        self.reference: Optional[float] = None  # best val mAP50-95 before the penalty (the adaptation's reference)
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
                    self.weight, sum(len(v) for v in self.targets.values()), len(self.targets), self.epoch)

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
            p.grad.index_add_(0, idx, self.weight * torch.sign(p.detach()[idx]))

    @torch.no_grad()
    def l1(self) -> float:
        """``sum (|gamma| + |beta|)`` over the targeted channels."""
        return float(sum(p.detach()[idx].abs().sum() for p, idx in self._parameters()))

    def penalty(self) -> float:
        """``weight * sum (|gamma| + |beta|)`` over the targeted channels (lambda as it is now)."""
        return self.weight * self.l1()

    def fit_epoch_end(self, epoch: int, val_map: Optional[float] = None) -> None:
        """``on_fit_epoch_end``: the epoch's penalty (and lambda) into the history; ``val_map``: YOLOv5's val
        mAP50-95 of the epoch (the reference before the penalty, the adaptation's input after)."""
        if not self.targets:
            if val_map is not None:
                self.reference = val_map if self.reference is None else max(self.reference, val_map)
            return
        l1 = self.l1()
        row = {"epoch": int(epoch), "regularize_penalty": round(self.weight * l1, 6), "regularize_l1": round(l1, 6),
               "regularize_weight": round(self.weight, 8),
               "regularize_channels": int(sum(len(v) for v in self.targets.values()))}
        change = self.adapt(l1, val_map)
        if change:
            row["regularize_change"] = change
        self.history.append(row)

    def adapt(self, l1: float, val_map: Optional[float]) -> Optional[str]:
        """Lambda for the next epoch from this one's val mAP50-95 and L1 sum (``reg.max_drop``; see the module
        docstring); returns what changed (None: nothing)."""
        cap = self.reg.max_drop
        if cap is None or val_map is None:
            return None
        if self.reference is None:
            self.reference = val_map  # the penalty began at the first epoch: its first epoch is the reference
        drop = self.reference - val_map
        lo, hi = self.reg.weight / 64, self.reg.weight * 4
        before = self.weight
        if drop > cap:
            self.weight = max(lo, self.weight / 2)
        elif drop <= cap / 2 and self.history and l1 > 0.9 * self.history[-1]["regularize_l1"]:
            self.weight = min(hi, self.weight * 1.5)
        if self.weight == before:
            return None
        what = (f"val mAP50-95 {val_map:.4f} is {drop:.4f} below {self.reference:.4f} (max_drop {cap:g})" if drop > cap
                else f"the L1 sum fell < 10 % ({self.history[-1]['regularize_l1']:.4g} -> {l1:.4g})")
        LOGGER.info("channel.regularize: lambda %.4g -> %.4g: %s", before, self.weight, what)
        return f"{before:.4g} -> {self.weight:.4g}: {what}"

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
