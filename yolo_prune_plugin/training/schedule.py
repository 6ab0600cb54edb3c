"""Gradual (unstructured) pruning during training, and the schedule arithmetic both schedules share.

``schedule.final_amount`` set (:class:`GradualPruning`, driven by the plugin's hooks): sparsity rises during
training along the cubic schedule of Zhu & Gupta (2017),
``s_e = s_f * (1 - (1 - (e - start) / (end - start))^3)``, updated at the start of every ``every``-th
epoch from ``start_epoch`` (and at ``end_epoch``), re-ranked each step with the configured method (the
data-aware ``obs`` is rejected: it costs 20-60 s of calibration per step). Pruned weights never come back
(zero weights rank lowest, so masks only grow). YOLOv5's ``best.pt`` is its fitness pick over *all*
epochs, often a denser early epoch; so the plugin keeps its own pick among the epochs at the final
sparsity (``epoch >= end_epoch``, highest fitness, ties: earliest, :func:`offer_candidate`), which the
pipeline writes as ``best_pruned.pt`` (EMA weights, exactly ``final_amount`` sparse). Zeros are held by
:class:`~yolo_prune_plugin.training.masks.MaskKeeper`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import torch.nn as nn

from ..backend.distributed import check_identical, from_rank0, is_main_process, tensors_digest
from ..backend.loading import Backend, load_checkpoint
from ..config import PruneConfig, ScheduleOptions, data_free_method
from ..errors import PruneError
from ..prune.unstructured import conv_layers, prune_model, sparsity_stats
from ..utils.files import atomic_path
from .dense_reference import DenseReference
from .masks import MaskKeeper, count_leaks, count_masked, file_leaks, zero_masks

LOGGER = logging.getLogger("yolo_prune_plugin")


# ---------------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------------
def cubic_sparsity(epoch: float, start: int, end: int, final: float) -> float:
    """Zhu & Gupta (2017): ``final * (1 - (1 - (epoch - start) / (end - start))^3)``; 0 before, ``final`` after."""
    if epoch < start:
        return 0.0
    if epoch >= end:
        return float(final)
    t = (epoch - start) / (end - start)
    return float(final) * (1.0 - (1.0 - t) ** 3)


def is_step_epoch(epoch: int, s: ScheduleOptions) -> bool:
    """Whether masks are recomputed at the start of ``epoch`` (every ``every`` epochs from start, and at end)."""
    return s.start_epoch <= epoch <= s.end_epoch and ((epoch - s.start_epoch) % s.every == 0 or epoch == s.end_epoch)


def schedule_amount(epoch: int, s: ScheduleOptions) -> float:
    """Target sparsity in force during ``epoch``: the cubic value at the latest step epoch ``<= epoch``."""
    if s.final_amount is None or epoch < s.start_epoch:
        return 0.0
    if epoch >= s.end_epoch:
        return float(s.final_amount)
    step = s.start_epoch + (epoch - s.start_epoch) // s.every * s.every
    return cubic_sparsity(step, s.start_epoch, s.end_epoch, s.final_amount)


def first_pruned_epoch(s: ScheduleOptions) -> int:
    """The first epoch trained pruned: the first step epoch with a target > 0 (``start_epoch``'s cubic value is 0,
    so it is ``start_epoch + every`` or ``end_epoch``, whichever comes first; ``start_epoch`` when they are equal)."""
    return next((e for e in range(s.start_epoch, s.end_epoch + 1)
                 if is_step_epoch(e, s) and schedule_amount(e, s) > 0), s.end_epoch + 1)


# ---------------------------------------------------------------------------------------------------
# history
# ---------------------------------------------------------------------------------------------------
def history_row(log_vals: Sequence[Any], epoch: int, fi: Any) -> dict:
    """One epoch of ``on_fit_epoch_end(log_vals, epoch, best_fitness, fi)``: losses + P, R, mAPs + lrs."""
    v = [float(x) for x in list(log_vals)[:13]]
    row: dict[str, Any] = {"epoch": int(epoch)}
    if len(v) >= 7:
        row.update({"P": round(v[3], 6), "R": round(v[4], 6), "mAP50": round(v[5], 6), "mAP50-95": round(v[6], 6)})
    if len(v) >= 13:
        row["lr"] = [round(x, 8) for x in v[10:13]]
    row["fitness"] = round(float(_scalar(fi)), 6)
    return row


def _scalar(x: Any) -> float:
    try:
        return float(x)
    except TypeError:
        return float(list(x)[0])


def offer_candidate(last: Any, epoch: int, fi: Any, end_epoch: int,
                    best: Optional[tuple[int, float]]) -> Optional[tuple[Path, tuple[int, float]]]:
    """A schedule's ``best_pruned.pt`` candidate: ``last`` copied aside when ``epoch`` is at the final sparsity
    (``>= end_epoch``) and its fitness ``fi`` beats ``best``; returns ``(copy, (epoch, fitness))`` or None."""
    if epoch < end_epoch:
        return None  # not at the final sparsity yet: never a candidate for best_pruned.pt
    f = _scalar(fi)
    if best is not None and f <= best[1]:
        return None
    cand = Path(last).with_name(".best_pruned_candidate.pt")
    with atomic_path(cand) as tmp:
        shutil.copyfile(last, tmp)
    return cand, (epoch, f)


# ---------------------------------------------------------------------------------------------------
# gradual pruning during training (schedule mode): the state behind the hook's schedule callbacks
# ---------------------------------------------------------------------------------------------------
class GradualPruning:
    """Sparsity rising along the cubic schedule inside YOLOv5's loop; picks the checkpoint for ``best_pruned.pt``.

    Driven by :class:`~yolo_prune_plugin.callbacks.PrunePlugin`'s hooks; :meth:`result` hands the pick to the
    pipeline at train end.
    """

    def __init__(self, config: PruneConfig, backend: Backend):
        self.config = config
        self.backend = backend
        self.keeper = MaskKeeper(backend, config.include, config.exclude, initial=None, warmup=True)
        self.steps: list[dict] = []
        self.history: list[dict] = []
        self.error: Optional[BaseException] = None
        self._epoch = 0
        self._best: Optional[tuple[int, float]] = None
        self.candidate: Optional[Path] = None
        self._dense_stats: Optional[dict] = None
        self._saved_leaks = 0
        self.dense = DenseReference(first_pruned_epoch(config.schedule))  # "before" metrics, bench baseline

    def train_start(self) -> None:
        k, c = self.keeper, self.config
        k.capture()
        self._epoch = k.start_epoch
        self.dense.capture(k.model, k.start_epoch)
        if k.resumed:  # the resumed weights already carry the zeros of the earlier epochs
            k.set_masks(zero_masks(k.model, c.include, c.exclude))
        else:
            self._dense_stats = sparsity_stats(k.model, conv_layers(k.model, c.include, c.exclude)).to_dict(
                per_layer=False)

    def epoch_start(self) -> None:
        epoch = self._epoch
        self._epoch += 1
        self.keeper.epoch_start()
        if is_step_epoch(epoch, self.config.schedule) and self.error is None:
            self._step(epoch)

    def _step(self, epoch: int) -> None:
        k, c = self.keeper, self.config
        target = schedule_amount(epoch, c.schedule)
        if target <= 0:
            return
        before = [id(m.weight) for _, m in conv_layers(k.model, c.include, c.exclude)]
        main = is_main_process()  # under DDP only rank 0 ranks the weights; the others take its masks
        res = prune_model(k.model, target, data_free_method(c), c.include, c.exclude, log=False) if main else None
        if [id(m.weight) for _, m in conv_layers(k.model, c.include, c.exclude)] != before:
            raise PruneError("schedule: pruning replaced the model's weight tensors; the optimizer would lose them")
        k.set_masks(from_rank0(zero_masks(k.model, c.include, c.exclude) if main else None))
        check_identical(tensors_digest(zero_masks(k.model, c.include, c.exclude)), f"schedule masks at epoch {epoch}")
        if res is None:
            return  # rank > 0: rank 0 keeps the record
        self.steps.append({"epoch": epoch, "target": round(target, 6), "zeros": res.after.zeros,
                           "weights": res.after.weights, "sparsity": round(res.after.sparsity, 6),
                           "masked": count_masked(k.masks), "seconds": round(res.seconds, 3)})
        LOGGER.info("yolo_prune_plugin: epoch %d: pruned to %.2f%% (target %.2f%%, %s, %.2fs)", epoch,
                    100 * res.after.sparsity, 100 * target, data_free_method(c), res.seconds)

    def fit_epoch_end(self, log_vals: Any, epoch: int, fi: Any) -> None:
        if any(r["epoch"] == int(epoch) for r in self.history):
            return
        k, c = self.keeper, self.config
        row = history_row(log_vals, epoch, fi)
        row["target"] = round(schedule_amount(int(epoch), c.schedule), 6)
        if k.model is not None:
            row["sparsity"] = round(sparsity_stats(k.model, conv_layers(k.model, c.include, c.exclude)).sparsity, 6)
            if k.ema is not None:
                row["ema_sparsity"] = round(sparsity_stats(k.ema.ema, conv_layers(k.ema.ema, c.include,
                                                                                  c.exclude)).sparsity, 6)
            row["leaked"] = k.leaks() if k.masks else {}
        self.history.append(row)

    def model_save(self, last: Any, epoch: int, fi: Any) -> None:
        epoch = int(epoch)
        if self.keeper.masks:
            n = sum(file_leaks(last, self.keeper.masks, self.backend).values())
            self._saved_leaks += n
            for r in self.history:
                if r["epoch"] == epoch:
                    r["leaked_saved"] = n
        picked = offer_candidate(last, epoch, fi, self.config.schedule.end_epoch, self._best)
        if picked:
            self.candidate, self._best = picked

    def result(self, last: Path, best: Path, epoch: int) -> tuple[dict, nn.Module, dict, dict, Optional[dict]]:
        """``(candidate checkpoint, its model, schedule section, leak counts, dense metrics row)`` at train end."""
        c, s, k, b = self.config, self.config.schedule, self.keeper, self.backend
        if self.error is not None:
            raise self.error
        if self.candidate is None or not self.candidate.is_file():
            raise PruneError(f"training ended at epoch {epoch}, before schedule.end_epoch {s.end_epoch} reached "
                             f"the final sparsity {s.final_amount}; no pruned checkpoint was written")
        masks = k.masks
        leaks = {f"live_{n}": v for n, v in k.leaks().items()}
        leaks["saved_last_each_epoch"] = self._saved_leaks
        if last.is_file():
            for n, v in file_leaks(last, masks, b).items():
                leaks[f"{last.name}:{n}"] = v
        yolo_best = None  # YOLOv5's fitness pick over all epochs: may be a denser epoch, so no leak check
        if best.is_file():
            bm = load_checkpoint(best, b)["model"]
            yolo_best = round(sparsity_stats(bm, conv_layers(bm, c.include, c.exclude)).sparsity, 6)
        cand = load_checkpoint(self.candidate, b)
        for n in ("model", "ema"):
            if isinstance(cand.get(n), nn.Module):
                leaks[f"epoch{self._best[0]}:{n}"] = count_leaks(cand[n], masks)
        model = cand.get("ema") or cand["model"]  # as saved (fp16): the pipeline writes this dtype
        leaks["best_pruned.pt"] = count_leaks(model, masks)
        weights = conv_layers(model, c.include, c.exclude)
        expected = (sum(int(round(float(s.final_amount) * m.weight.numel())) for _, m in weights)
                    if c.method == "layerwise" else
                    int(round(float(s.final_amount) * sum(m.weight.numel() for _, m in weights))))
        if sum(leaks.values()) or count_masked(masks) < expected:
            raise PruneError(f"schedule: final masks hold {count_masked(masks)} weights (expected {expected}) or "
                             f"pruned weights leaked ({leaks}); best_pruned.pt not written")
        dense_epoch = self.dense.dense_epoch
        before_row = self.dense.row(self.history)
        section = {**vars(s), "steps": self.steps, "source_epoch": self._best[0],
                   "source_fitness": round(self._best[1], 6), "masked_weights": count_masked(masks),
                   "expected_zeros": expected, "yolov5_best_sparsity": yolo_best, "dense_stats": self._dense_stats,
                   "dense_epoch": dense_epoch}
        return cand, model, section, leaks, before_row

    def close(self) -> None:
        """Remove the optimizer hooks, the dense snapshot and the candidate file (also after a crash)."""
        self.keeper.remove_hooks()
        self.dense.release()
        if self.candidate is not None and self.candidate.exists():
            self.candidate.unlink()
