"""Channel pruning at the schedule's step epochs inside YOLOv5's own training loop (``structure: channel`` +
``schedule:``).

:class:`ChannelSchedule` has the interface of :class:`~yolo_prune_plugin.training.schedule.GradualPruning` and is driven by
the same hooks of :class:`~yolo_prune_plugin.callbacks.PrunePlugin`. At the start of every step epoch
(:func:`~yolo_prune_plugin.training.schedule.is_step_epoch`) whole output channels are removed with
:func:`~yolo_prune_plugin.prune.channel.channel_prune` until the fraction of the in-scope Conv2d weights removed,
measured against the **dense** model, is the cubic schedule's target for that epoch
(:func:`~yolo_prune_plugin.training.schedule.schedule_amount`): steps do not compound, each step removes what is missing.

What one step does to YOLOv5's training objects (read from ``train()``'s frame at ``on_train_start``):

* **EMA first.** Channels are ranked on (a copy of) ``ema.ema``, the model YOLOv5 validates and saves, with a
  data-free importance (``channel.importance``; default ``l1``: the data-aware ``taylor`` would need a labelled
  batch and a backward pass per step and is refused, like ``obs`` in the unstructured schedule). The pruned copy
  replaces ``ema.ema``, so the running average is kept for the surviving channels.
* **Live model, same channels.** The EMA's kept channel indices (``ChannelPruneResult.kept``) become the removal
  plan for the live model (identical graph, identical group roots), so model and EMA keep the same
  architecture and the same channels and ``ModelEMA.update`` goes on working. It is tried on a copy first: a
  step that fails (amount not reachable at ``round_to``) changes nothing, the error is reported at train end.
* **Optimizer.** Torch-Pruning replaces every pruned ``weight``/``bias`` by a new ``nn.Parameter``; YOLOv5's
  optimizer would keep updating the stale tensors. :func:`~yolo_prune_plugin.backend.training_loop.replace_optimizer_params`
  swaps each one for its replacement in its own param group (``smart_optimizer``'s bias / decayed
  weight / BatchNorm weight groups) and drops its optimizer state: **momentum (SGD) and Adam moments restart** for the
  changed tensors, unchanged tensors keep theirs. ``requires_grad`` (``--freeze``) is carried over.
* Nothing else in ``train()`` holds parameters: ``ComputeLoss`` keeps Detect's anchors and hyp (Detect's
  output convs are never pruned, only their input channels), GradScaler keeps per-step state only, the LR
  scheduler keeps the param groups (the same dicts). DDP (its buckets hold parameters) and ``--resume``
  (YOLOv5 would rebuild the dense YAML) are refused by :func:`check_channel_schedule` before any epoch.

``best_pruned.pt`` comes from the best epoch at the final architecture (``epoch >= end_epoch``), as in the
unstructured schedule; the pipeline writes it (plain YOLOv5 module, loads with ``attempt_load``). The report's
``channels`` section compares the written model with the dense model of ``on_train_start``.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from ..backend.loading import Backend, load_checkpoint
from ..backend.training_loop import replace_optimizer_params, training_objects
from ..config import PruneConfig
from ..errors import ConfigError, PruneError
from ..prune.registry import DATA_AWARE_CHANNEL_IMPORTANCES
from ..prune.unstructured import check_scope, conv_layers, count_parameters, sparsity_stats
from .dense_reference import DenseReference
from .schedule import first_pruned_epoch, history_row, is_step_epoch, offer_candidate, schedule_amount

LOGGER = logging.getLogger("yolo_prune_plugin")

#: importance used at schedule steps when ``channel.importance`` is null (data-free; see the module docstring)
SCHEDULE_IMPORTANCE = "l1"
#: tracing size of the dependency graph (channel counts do not depend on it)
_TRACE_IMGSZ = 64

__all__ = ["ChannelSchedule", "check_channel_schedule", "apply_kept_channels", "SCHEDULE_IMPORTANCE"]


def check_channel_schedule(config: PruneConfig, opt: Any = None) -> None:
    """Raise :class:`ConfigError` (before any epoch) when a channel schedule cannot run in this context."""
    imp = config.channel.importance
    if imp in DATA_AWARE_CHANNEL_IMPORTANCES:
        raise ConfigError(f"schedule with structure: channel: channel.importance {imp!r} needs a labelled batch and "
                          f"a backward pass at every step; use l1, l2, bn or lamp (null = {SCHEDULE_IMPORTANCE})")
    if int(os.getenv("WORLD_SIZE", 1)) > 1:
        raise ConfigError("schedule with structure: channel cannot run under DDP (DistributedDataParallel keeps the "
                          "parameters it was built with); train single-process, or prune with 'finetune:' after")
    resume = (opt.get("resume") if isinstance(opt, Mapping) else getattr(opt, "resume", None)) if opt else None
    if resume:
        raise ConfigError("schedule with structure: channel cannot --resume (YOLOv5 rebuilds the dense model from "
                          "its YAML and would silently re-initialise the pruned layers); start the run again")


def _ignored(model: nn.Module, include: tuple, exclude: tuple) -> list[str]:
    """Conv names whose output channels stay: out of scope, and Detect's outputs (as channel_prune does)."""
    from ..prune.channel import detect_output_convs

    scope = {n for n, _ in check_scope(model, include, exclude)}
    det = set(detect_output_convs(model))
    names = {m: n for n, m in model.named_modules()}
    out = [n for n, m in conv_layers(model) if n not in scope or m in det]
    return list(dict.fromkeys(out + [names[m] for m in det]))


def apply_kept_channels(model: nn.Module, kept: Mapping[str, list], include: tuple = (), exclude: tuple = (),
                        trace_imgsz: int = _TRACE_IMGSZ) -> None:
    """Remove from ``model`` (in place) the output channels another copy of the same architecture lost.

    ``kept``: :attr:`~yolo_prune_plugin.prune.channel.ChannelPruneResult.kept` of that copy (conv name -> original
    channel indices it kept). Each dependency group whose root conv is in ``kept`` loses the complement, with
    all its couplings (BatchNorm, consumers, residuals, Concat). BatchNorm statistics are untouched (eval mode).
    """
    from ..prune.channel import _apply_plan

    mods = dict(model.named_modules())
    plan = {}
    for name, keep in kept.items():
        conv = mods.get(name)
        if not isinstance(conv, nn.Conv2d):
            raise PruneError(f"channel schedule: {name!r} is not a Conv2d of the model being pruned")
        plan[name] = sorted(set(range(conv.out_channels)) - {int(i) for i in keep})
    was = model.training
    model.eval()  # the trace's forward pass must not move BatchNorm running statistics
    try:
        _apply_plan(model, plan, _ignored(model, tuple(include), tuple(exclude)), trace_imgsz)
    finally:
        model.train(was)


class ChannelSchedule:
    """Channels removed at the schedule's step epochs inside YOLOv5's loop; picks the checkpoint for
    ``best_pruned.pt`` among the epochs at the final architecture. Same hooks as ``GradualPruning``."""

    def __init__(self, config: PruneConfig, backend: Backend):
        self.config = config
        self.backend = backend
        self.model: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.ema: Any = None
        self.imgsz = 640
        self.steps: list[dict] = []
        self.history: list[dict] = []
        self.error: Optional[BaseException] = None
        self.candidate: Optional[Path] = None
        self.channels: Optional[dict] = None  # the report's channels section, set by result()
        self._epoch = 0
        self._best: Optional[tuple[int, float]] = None
        self._dense: dict = {}
        self._dense_stats: Optional[dict] = None
        self.dense = DenseReference(first_pruned_epoch(config.schedule))  # "before" metrics, bench baseline

    @property
    def importance(self) -> str:
        return self.config.channel.importance or SCHEDULE_IMPORTANCE

    # -- hooks ----------------------------------------------------------------------------------------
    def train_start(self) -> None:
        objs = training_objects(self.backend)
        if objs.resumed:
            raise PruneError("schedule with structure: channel cannot resume a run (YOLOv5 rebuilt the dense model "
                             "from its YAML); start the run again")
        if objs.ema is None:
            raise PruneError("schedule with structure: channel needs YOLOv5's EMA (rank 0, single process)")
        self.model, self.optimizer, self.ema = objs.model, objs.optimizer, objs.ema
        self.imgsz = int(objs.imgsz or 640)
        self._epoch = objs.start_epoch
        self.dense.capture(self.model, objs.start_epoch)
        c = self.config
        m = self.ema.ema
        from ..prune.channel import channel_counts, gflops

        self._dense = {"params": count_parameters(m), "gflops": gflops(m, self.imgsz),
                       "conv_weights": self._conv_weights(m), "channels": channel_counts(m)}
        self._dense_stats = sparsity_stats(m, conv_layers(m, c.include, c.exclude)).to_dict(per_layer=False)

    def epoch_start(self) -> None:
        epoch = self._epoch
        self._epoch += 1
        if is_step_epoch(epoch, self.config.schedule) and self.error is None:
            self._step(epoch)

    def fit_epoch_end(self, log_vals: Any, epoch: int, fi: Any) -> None:
        if any(r["epoch"] == int(epoch) for r in self.history):
            return  # COCO's extra call after the final validation
        row = history_row(log_vals, epoch, fi)
        row["target"] = round(schedule_amount(int(epoch), self.config.schedule), 6)
        if self.model is not None and self._dense:
            row["removed"] = round(self._removed(self.model), 6)
            row["ema_removed"] = round(self._removed(self.ema.ema), 6)
            row["params"] = count_parameters(self.ema.ema)
        self.history.append(row)

    def model_save(self, last: Any, epoch: int, fi: Any) -> None:
        picked = offer_candidate(last, int(epoch), fi, self.config.schedule.end_epoch, self._best)  # final width only
        if picked:
            self.candidate, self._best = picked

    # -- one step --------------------------------------------------------------------------------------
    def _conv_weights(self, model: nn.Module) -> int:
        return sum(m.weight.numel() for _, m in conv_layers(model, self.config.include, self.config.exclude))

    def _removed(self, model: nn.Module) -> float:
        """Fraction of the dense in-scope Conv2d weights removed from ``model``."""
        return 1 - self._conv_weights(model) / self._dense["conv_weights"]

    def _step(self, epoch: int) -> None:
        from ..prune.channel import channel_counts, channel_prune

        c, s = self.config, self.config.schedule
        target = schedule_amount(epoch, s)
        if target <= 0 or self.model is None:
            return
        t0 = time.perf_counter()
        now = self._conv_weights(self.ema.ema)
        rel = 1 - (1 - target) * self._dense["conv_weights"] / now  # of what is left, to reach target of dense
        if rel <= 0:
            return
        # everything that can fail runs on copies first: a failed step leaves YOLOv5's objects as they were
        ema = copy.deepcopy(self.ema.ema)
        res = channel_prune(ema, rel, importance=self.importance, round_to=c.channel.round_to, include=c.include,
                            exclude=c.exclude, max_layer_ratio=c.channel.max_layer_ratio, imgsz=self.imgsz,
                            cost_aware=c.channel.cost_aware, round_share=c.channel.round_share, log=False)
        for p in ema.parameters():  # Torch-Pruning's new Parameters require grad; ModelEMA's never do
            p.requires_grad_(False)
        trial = copy.deepcopy(self.model)
        apply_kept_channels(trial, res.kept, c.include, c.exclude)
        if channel_counts(trial) != channel_counts(ema):
            raise PruneError("channel schedule: the live model and its EMA would lose different channels")
        del trial
        before = dict(self.model.named_parameters())
        apply_kept_channels(self.model, res.kept, c.include, c.exclude)
        self.ema.ema = ema
        after = dict(self.model.named_parameters())
        replaced = {id(before[n]): p for n, p in after.items() if p is not before[n]}
        for n, p in after.items():
            p.requires_grad_(before[n].requires_grad)
        swapped = replace_optimizer_params(self.optimizer, replaced)
        if swapped != len(replaced) or set(after) != set(before):
            raise PruneError(f"channel schedule: YOLOv5's optimizer held {swapped} of the {len(replaced)} replaced "
                             "parameters; training would go on with stale tensors")
        removed = self._removed(ema)
        self.steps.append({"epoch": epoch, "target": round(target, 6), "step_amount": round(rel, 6),
                           "removed": round(removed, 6), "conv_weights": self._conv_weights(ema),
                           "params": count_parameters(ema), "parameters_replaced": len(replaced),
                           "seconds": round(time.perf_counter() - t0, 3)})
        LOGGER.info("yolo_prune_plugin: epoch %d: channels pruned, %.2f%% of the dense Conv2d weights removed "
                    "(target %.2f%%, %s, params %d -> %d; optimizer state of %d tensors reset)", epoch,
                    100 * removed, 100 * target, self.importance, res.params_before, count_parameters(ema),
                    len(replaced))

    # -- train end -------------------------------------------------------------------------------------
    def result(self, last: Path, best: Path, epoch: int) -> tuple[dict, nn.Module, dict, Optional[dict],
                                                                    Optional[dict]]:
        """``(candidate checkpoint, its model, schedule section, leaks (None), dense metrics row)`` at train end;
        sets :attr:`channels` (the report's channels section)."""
        from ..prune.channel import AMOUNT_TOLERANCE, channel_counts, gflops

        c, s, b = self.config, self.config.schedule, self.backend
        if self.error is not None:
            raise self.error
        if self.candidate is None or not self.candidate.is_file():
            raise PruneError(f"training ended at epoch {epoch}, before schedule.end_epoch {s.end_epoch} reached "
                             f"the final amount {s.final_amount}; no pruned checkpoint was written")
        cand = load_checkpoint(self.candidate, b)
        model = cand.get("ema") or cand["model"]  # as saved (fp16): the pipeline writes this dtype
        final = channel_counts(model)
        if final != channel_counts(self.ema.ema):
            raise PruneError(f"channel schedule: the epoch-{self._best[0]} checkpoint does not have the final "
                             "architecture; best_pruned.pt not written")
        achieved = self._removed(model)
        if abs(achieved - float(s.final_amount)) > AMOUNT_TOLERANCE:
            raise PruneError(f"channel schedule: {achieved:.1%} of the dense Conv2d weights removed, expected "
                             f"{s.final_amount:.1%} +- {AMOUNT_TOLERANCE:.0%}; best_pruned.pt not written")
        d = self._dense
        self.channels = {
            "structure": "channel", "importance": self.importance, "amount": float(s.final_amount),
            "achieved": round(achieved, 6), "round_to": c.channel.round_to, "params_before": d["params"],
            "params_after": count_parameters(model), "gflops_before": d["gflops"],
            "gflops_after": gflops(copy.deepcopy(model).float(), self.imgsz), "conv_weights_before": d["conv_weights"],
            "conv_weights_after": self._conv_weights(model), "max_layer_ratio": c.channel.max_layer_ratio,
            "cost_aware": float(c.channel.cost_aware), "steps": len(self.steps),
            "channels": {n: {"before": d["channels"][n], "after": v} for n, v in final.items()}}
        yolo_best = None  # YOLOv5's fitness pick over all epochs: may be an earlier, wider epoch
        if best.is_file():
            bm = load_checkpoint(best, b)["model"]
            yolo_best = round(self._removed(bm), 6)
        dense_epoch = self.dense.dense_epoch  # the last epoch trained at full width
        before_row = self.dense.row(self.history)
        section = {**vars(s), "structure": "channel", "steps": self.steps, "source_epoch": self._best[0],
                   "source_fitness": round(self._best[1], 6), "yolov5_best_removed": yolo_best,
                   "dense_stats": self._dense_stats, "dense_epoch": dense_epoch}
        return cand, model, section, None, before_row

    def close(self) -> None:
        """Remove the dense snapshot and the candidate file (also after a crash)."""
        self.dense.release()
        if self.candidate is not None and self.candidate.exists():
            self.candidate.unlink()
