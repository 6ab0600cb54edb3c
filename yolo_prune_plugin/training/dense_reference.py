"""The dense reference of a schedule run: what its report compares the pruned model with.

In schedule mode (:class:`~yolo_prune_plugin.training.schedule.GradualPruning`,
:class:`~yolo_prune_plugin.training.channel_schedule.ChannelSchedule`) the file the pipeline starts from
(``last.pt``) is already pruned, so neither the "before" metrics nor the ``bench: true`` baseline may come from it. :class:`DenseReference` (one per schedule, shared by
both) holds, in this order of preference:

* **"before" metrics**: YOLOv5's own validation of the last epoch trained dense (unstructured: no zeros yet;
  channel: full width), from the training history; the epoch before the first one a schedule step prunes
  (:func:`~yolo_prune_plugin.training.schedule.first_pruned_epoch`; the cubic target of ``start_epoch`` is 0).
* when no such epoch was trained in this process (``start_epoch == end_epoch`` prunes at the first epoch, or a
  resumed run): the plugin's own validation of the **dense starting weights**, a CPU snapshot of YOLOv5's live
  model taken at ``on_train_start`` before any step (:meth:`DenseReference.capture`);
* when that snapshot is not dense either (a run resumed after pruning began): no "before" metrics, and
  ``metrics_before_source`` says why. Never the pruned model's numbers.

The bench baseline is the same snapshot (real dense weights) or, without one, the dense architecture rebuilt
from the checkpoint's model YAML (random weights: latency, params and GFLOPs only); the report's first bench row
says which (``reference``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch.nn as nn

from ..backend.evaluation import Metrics

LOGGER = logging.getLogger("yolo_prune_plugin")

__all__ = ["DenseReference", "DenseBefore", "ReferenceModel", "rebuild_dense"]


@dataclass
class ReferenceModel:
    """A dense model standing in for the source file: ``weights`` True = real dense weights (can be validated),
    False = the architecture only (random weights: latency, params, GFLOPs)."""

    model: nn.Module
    weights: bool
    note: str  # what it is, for the report


@dataclass
class DenseBefore:
    """Where a schedule run's "before" numbers come from.

    ``metrics``: from the training history (None: validate ``reference`` when it holds weights, else absent);
    ``source``: the report's ``metrics_before_source`` (or the reason they are absent); ``reference``: the dense
    model for the validation and the bench baseline; ``epoch``: the last dense epoch of the schedule.
    """

    metrics: Optional[Metrics]
    source: str
    reference: Optional[ReferenceModel]
    epoch: int


class DenseReference:
    """The dense starting weights of a schedule run and the choice of its "before" metrics (see module doc).

    ``first_pruned``: the first epoch that trains pruned (:func:`~yolo_prune_plugin.training.schedule.first_pruned_epoch`).
    """

    def __init__(self, first_pruned: int):
        self.first_pruned = int(first_pruned)
        self.model: Optional[nn.Module] = None  # CPU snapshot of the dense starting weights
        self.start_epoch: Optional[int] = None
        self.reason: Optional[str] = "training did not start (no on_train_start)"

    @property
    def dense_epoch(self) -> int:
        """The last epoch trained before any weight or channel was pruned."""
        return self.first_pruned - 1

    def capture(self, model: nn.Module, start_epoch: int) -> None:
        """Call at ``on_train_start``, before any step: keep a CPU copy of ``model`` while it is still dense."""
        self.start_epoch = int(start_epoch)
        if self.start_epoch > self.first_pruned:
            self.model = None
            self.reason = (f"the run resumed at epoch {self.start_epoch}, after pruning began (epoch "
                           f"{self.first_pruned}): its dense weights are not in this run")
            return
        m = getattr(model, "module", model)  # DataParallel / DDP
        snap = copy.deepcopy(m).cpu().float().eval()
        for p in snap.parameters():
            p.requires_grad_(False)
        self.model, self.reason = snap, None

    def release(self) -> None:
        """Drop the snapshot (a full model copy) once the pipeline is done with it."""
        if self.model is not None:
            self.model, self.reason = None, "released after train end"

    def row(self, history: Sequence[dict]) -> Optional[dict]:
        """YOLOv5's validation of :attr:`dense_epoch` in ``history`` (None when that epoch did not run here)."""
        return next((r for r in history if r.get("epoch") == self.dense_epoch and "mAP50" in r), None)

    def before(self, history: Sequence[dict]) -> DenseBefore:
        """The "before" metrics and the dense reference of the finished run."""
        ref = None
        if self.model is not None:
            ref = ReferenceModel(self.model, True, f"dense starting weights (snapshot at on_train_start, epoch "
                                                   f"{self.start_epoch}, before any schedule step)")
        row = self.row(history)
        if row is not None:
            metrics = Metrics.from_results([row[k] for k in ("P", "R", "mAP50", "mAP50-95")])
            return DenseBefore(metrics, f"epoch {self.dense_epoch} (dense, training history)", ref, self.dense_epoch)
        why = (f"epoch {self.dense_epoch} is the last dense epoch and was not trained in this run"
               if self.dense_epoch >= 0 else f"the schedule prunes from epoch {self.first_pruned}: no dense epoch")
        if ref is not None:
            return DenseBefore(None, f"{ref.note}, validated by the plugin ({why})", ref, self.dense_epoch)
        return DenseBefore(None, f"absent: {why}, and {self.reason}", None, self.dense_epoch)


def rebuild_dense(model: nn.Module, backend: Any) -> Optional[ReferenceModel]:
    """The dense architecture of ``model`` rebuilt from its YOLOv5 model YAML (``model.yaml``; channel pruning
    does not change it), random weights; None when the model has no YAML."""
    cfg = getattr(model, "yaml", None)
    if not isinstance(cfg, dict):
        return None
    dense = backend.yolo.Model(copy.deepcopy(cfg), ch=int(cfg.get("ch", 3)), nc=getattr(model, "nc", None))
    for k in ("names", "stride", "nc", "hyp"):
        if hasattr(model, k):
            setattr(dense, k, copy.deepcopy(getattr(model, k)))
    return ReferenceModel(dense.float().eval(), False, "dense architecture rebuilt from the checkpoint's model "
                                                       "YAML (random weights: latency, params and GFLOPs only)")
