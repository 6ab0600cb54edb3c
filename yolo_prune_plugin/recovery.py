"""Recovery inside YOLOv5's own training loop: masked fine-tuning after pruning, and gradual pruning.

(Over 400 lines: the two recovery modes share the mask keeping, leak counting and history code below.)

``finetune.epochs > 0`` (:func:`finetune_checkpoint`, called by the pipeline after the one-shot prune)
    YOLOv5's ``train.main`` runs again on the one-shot ``best_pruned.pt`` for ``epochs`` epochs (run folder
    ``<run>_finetune`` beside the run, ``lr0`` and ``warmup_bias_lr`` times ``lr_scale``, same data and
    options) while the pruned positions are held at exactly zero; the pipeline writes the fine-tuned best
    as ``best_pruned.pt``.

``schedule.final_amount`` set (:class:`GradualPruning`, driven by the plugin's hooks)
    Sparsity rises during training along the cubic schedule of Zhu & Gupta (2017),
    ``s_e = s_f * (1 - (1 - (e - start) / (end - start))^3)``, updated at the start of every ``every``-th
    epoch from ``start_epoch`` (and at ``end_epoch``), re-ranked each step with the configured method (the
    data-aware ``obs`` is rejected: it costs 20-60 s of calibration per step). Pruned weights never come back
    (zero weights rank lowest, so masks only grow). YOLOv5's ``best.pt`` is its fitness pick over *all*
    epochs, often a denser early epoch; so the plugin keeps its own pick among the epochs at the final
    sparsity (``epoch >= end_epoch``, highest fitness, ties: earliest), which the pipeline writes as
    ``best_pruned.pt`` (EMA weights, exactly ``final_amount`` sparse).

How zeros are kept exact without pruning re-parametrisation: callbacks never see the optimizer or the EMA, so
at ``on_train_start`` they are read from ``train()``'s frame (:func:`~yolo_prune_plugin.adapter.training_objects`,
nothing of YOLOv5 is patched). A step pre-hook on the optimizer zeroes the gradients of
masked weights and a step post-hook zeroes the weights (GradScaler calls ``optimizer.step``, so both fire;
a skipped AMP step changes nothing). With weight and gradient zero, SGD (momentum, nesterov, weight decay),
Adam and AdamW leave the weight at zero, and the EMA (``d * ema + (1 - d) * model``) stays zero once zeroed.
When masks grow, the new positions are also zeroed in the EMA and in the optimizer state (momentum, Adam
moments). Hooks live on the optimizer, so checkpoints (deep copies of model and EMA) carry no hooks, no
``weight_orig``/``weight_mask`` and load in plain YOLOv5. One side effect: ``clip_grad_norm_`` runs before
the step, so masked gradients still count toward YOLOv5's clipping norm (max 10).

Fine-tune learning rate: YOLOv5's warmup always lasts at least 100 iterations, starting every lr at 0 and
the bias lr at ``warmup_bias_lr`` (0.1), which is most or all of a short fine-tune. With ``warmup=False``
(the default, :data:`FINETUNE_WARMUP`) a step pre-hook restores each group's scheduled lr and momentum
before every step. Measured with ``scripts/benchmark_recovery.py`` (yolov5n, coco128 @ 320, 50% global,
mAP50-95 of one-shot 0.219, dense 0.291): lr_scale 0.1, 10 epochs: masked FT 0.283 without warmup vs
0.248 with it (with warmup the lr never leaves ~0, the gain is mostly BatchNorm re-estimation); lr_scale 1.0,
10 epochs, no warmup: 0.331 (dense fine-tuned alike: 0.320). A high lr without warmup needs epochs: at
lr_scale 1.0 the first 2-3 epochs collapse (0.10-0.15) before recovering.

"Zero leakage" is counted (non-zero values at pruned positions) in the live model and EMA after every epoch,
in ``last.pt`` (model and EMA) after every save, in the final ``last.pt``/``best.pt`` and in the written
``best_pruned.pt``; the counts go in the report and any leak raises :class:`PruneError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import yaml

from .adapter import (Backend, driving_yolov5, get_backend, keep_checkpoint_architecture, load_checkpoint,
                      training_objects)
from .config import DATA_AWARE_METHODS, PruneConfig, ScheduleOptions, data_free_method
from .dense_reference import DenseReference
from .errors import ConfigError, PruneError
from .pruning import conv_layers, prune_model, sparsity_stats
from .report import atomic_path

LOGGER = logging.getLogger("yolo_prune_plugin")

#: Default for the fine-tune's learning-rate warmup (see the module docstring and the benchmark).
FINETUNE_WARMUP = False
#: Options of the original run that the fine-tune run does not inherit (it must not upload or resume).
_NOT_INHERITED = {"weights", "cfg", "hyp", "resume", "evolve", "epochs", "imgsz", "project", "name", "exist_ok",
                  "save_dir", "hf_model_id", "hf_token", "hf_private", "hf_dataset_id", "roboflow_upload",
                  "roboflow_token", "s3_upload_dir", "upload_dataset", "bucket", "local_rank",
                  "neptune_resume_id"}

Masks = dict[str, torch.Tensor]  # Conv2d module name -> bool tensor, True where the weight is pruned


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
    frame (:func:`~yolo_prune_plugin.adapter.training_objects`; no YOLOv5 name is patched). ``initial`` decides
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
        with torch.no_grad():
            for p, mask in self._params:
                p.masked_fill_(mask, 0)


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
# fine-tune with YOLOv5's train.main
# ---------------------------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    """What :func:`finetune_checkpoint` did."""

    save_dir: Path
    best: Path  # the file to keep: best.pt, or last.pt when YOLOv5 saved no best.pt
    last: Path
    results: Optional[tuple]  # YOLOv5's final validation of best.pt (P, R, mAP50, mAP50-95, losses)
    history: list[dict]
    leaks: dict[str, int]  # live model/EMA at the end, every saved last.pt, final last.pt/best.pt
    masked: int
    seconds: float
    imgsz: int
    hyp: dict
    warmup: bool
    model: Optional[nn.Module] = field(default=None, repr=False)  # the live training objects (tests)
    ema_model: Optional[nn.Module] = field(default=None, repr=False)
    masks: Masks = field(default_factory=dict, repr=False)

    @property
    def leaked(self) -> int:
        return sum(self.leaks.values())


def _as_dict(opt: Any) -> dict:
    if opt is None:
        return {}
    return dict(opt) if isinstance(opt, Mapping) else dict(vars(opt))


def load_hyp(hyp: Any, backend: Backend) -> dict:
    """The hyperparameter dict of a run: ``opt.hyp`` is a dict after training, a YAML path before."""
    if isinstance(hyp, Mapping):
        return dict(hyp)
    path = Path(str(hyp)) if hyp else Path(backend.root) / "data" / "hyps" / "hyp.scratch-low.yaml"
    if not path.is_file():
        path = Path(backend.root) / "data" / "hyps" / path.name
    if not path.is_file():
        raise ConfigError(f"{hyp}: hyperparameter YAML not found")
    return dict(yaml.safe_load(path.read_text(encoding="utf-8")))


def finetune_hyp(hyp: Mapping[str, Any], lr_scale: float, warmup: bool) -> dict:
    """``hyp`` with ``lr0`` and ``warmup_bias_lr`` scaled; ``warmup_epochs`` 0 when warmup is off."""
    out = dict(hyp)
    out["lr0"] = float(out["lr0"]) * lr_scale
    out["warmup_bias_lr"] = float(out.get("warmup_bias_lr", 0.1)) * lr_scale
    if not warmup:
        out["warmup_epochs"] = 0.0
    return out


def finetune_checkpoint(weights: str | Path, base_opt: Any, epochs: int, *, lr_scale: float = 0.1,
                        imgsz: Optional[int] = None, include: Sequence[str] = (), exclude: Sequence[str] = (),
                        masks: Masks | str | None = "zeros", warmup: bool = FINETUNE_WARMUP,
                        project: str | Path | None = None, name: Optional[str] = None,
                        hyp_path: str | Path | None = None, backend: Optional[Backend] = None,
                        keep_architecture: bool = False, **train_overrides: Any) -> FinetuneResult:
    """Train ``weights`` for ``epochs`` more epochs with YOLOv5's ``train.main``, holding ``masks`` at zero.

    ``base_opt`` (a YOLOv5 train ``opt`` or its ``vars``) gives data, batch size, device, optimizer, hyp, ...;
    ``masks``: ``"zeros"`` (the checkpoint's zero Conv2d weights in scope), a :data:`Masks` dict, or None
    (dense fine-tune, e.g. a baseline). ``keep_architecture``: train the module stored in ``weights`` (a
    channel-pruned model) instead of YOLOv5 rebuilding its YAML. ``train_overrides`` are further YOLOv5 options. The run goes to
    ``project/name`` (never overwriting: YOLOv5 increments the name). Raises :class:`PruneError` on a leak.
    """
    b = backend or get_backend()
    weights = Path(weights).expanduser().resolve()
    base = _as_dict(base_opt)
    if epochs < 1:
        raise ConfigError(f"finetune.epochs must be >= 1, got {epochs}")
    hyp = finetune_hyp(load_hyp(base.get("hyp"), b), lr_scale, warmup)
    opt = b.train.parse_opt(True)
    for k, v in base.items():
        if k not in _NOT_INHERITED and hasattr(opt, k):
            setattr(opt, k, v)
    project = Path(project or base.get("project") or "runs/train").expanduser().resolve()
    name = name or f"{Path(str(base.get('save_dir') or 'exp')).name}_finetune"
    hyp_path = Path(hyp_path).resolve() if hyp_path else project / f"{name}_hyp.yaml"
    hyp_path.parent.mkdir(parents=True, exist_ok=True)
    hyp_path.write_text(yaml.safe_dump(hyp, sort_keys=False), encoding="utf-8")
    opt.weights, opt.cfg, opt.hyp, opt.resume, opt.evolve = str(weights), "", str(hyp_path), False, None
    opt.epochs, opt.imgsz = int(epochs), int(imgsz or base.get("imgsz") or 640)
    opt.project, opt.name, opt.exist_ok = str(project), name, False
    opt.noautoanchor = True  # keep the anchors the weights were trained with
    opt.roboflow_upload, opt.upload_dataset, opt.s3_upload_dir, opt.hf_model_id = False, False, None, None
    for k, v in train_overrides.items():
        if not hasattr(opt, k):
            raise ConfigError(f"finetune: unknown YOLOv5 train option {k!r}")
        setattr(opt, k, v)
    if isinstance(masks, Mapping):
        masks = {n: m.cpu().bool() for n, m in masks.items()}

    keeper = MaskKeeper(b, include, exclude, initial=masks, warmup=warmup)
    state: dict[str, Any] = {"history": [], "saved_leaks": 0}

    def train_start() -> None:
        keeper.capture()

    def fit_epoch_end(log_vals: Any, epoch: int, best_fitness: Any, fi: Any) -> None:
        if any(r["epoch"] == int(epoch) for r in state["history"]):
            return  # COCO's extra call after the final validation
        row = history_row(log_vals, epoch, fi)
        live = keeper.leaks()
        row.update({"sparsity": round(sparsity_stats(keeper.model, conv_layers(keeper.model, include, exclude))
                                      .sparsity, 6), "leaked": live})
        state["history"].append(row)

    def model_save(last: Any, epoch: int, final_epoch: Any, best_fitness: Any, fi: Any) -> None:
        if keeper.masks:
            n = sum(file_leaks(last, keeper.masks, b).values())
            state["saved_leaks"] += n
            for r in state["history"]:
                if r["epoch"] == int(epoch):
                    r["leaked_saved"] = n

    def train_end(last: Any, best: Any, epoch: int, results: Any) -> None:
        state.update(last=Path(last), best=Path(best), results=tuple(float(x) for x in results))

    cb = b.Callbacks()
    HOOK_NAME = "yolo_prune_plugin"
    for hook, fn in (("on_train_start", train_start),
                     ("on_train_epoch_start", keeper.epoch_start),
                     ("on_train_batch_end", lambda *a, **k: keeper.batch_end()), ("on_fit_epoch_end", fit_epoch_end),
                     ("on_model_save", model_save), ("on_train_end", train_end)):
        cb.register_action(hook, name=HOOK_NAME, callback=fn)
    LOGGER.info("yolo_prune_plugin: fine-tuning %s for %d epochs (lr0 %.4g, %s masked weights, warmup %s)",
                weights.name, epochs, hyp["lr0"], "no" if not masks else "the pruned", "on" if warmup else "off")
    t0 = time.perf_counter()
    try:
        with driving_yolov5(b), (keep_checkpoint_architecture(b, weights) if keep_architecture
                                  else contextlib.nullcontext()):
            b.train.main(opt, callbacks=cb)
    finally:
        keeper.remove_hooks()
    seconds = time.perf_counter() - t0
    if "last" not in state:
        raise PruneError(f"fine-tune run {opt.save_dir} ended without on_train_end (stopped early?)")
    last, best = state["last"], state["best"]
    keep = best if best.is_file() else last
    if not keep.is_file():
        raise PruneError(f"fine-tune run {opt.save_dir} saved no checkpoint")
    leaks = {f"live_{k}": v for k, v in keeper.leaks().items()} if keeper.masks else {}
    if keeper.masks:
        leaks["saved_last_each_epoch"] = state["saved_leaks"]
        for f in dict.fromkeys((last, best)):
            if f.is_file():
                for k, v in file_leaks(f, keeper.masks, b).items():
                    leaks[f"{f.name}:{k}"] = v
    result = FinetuneResult(Path(opt.save_dir), keep, last, state.get("results"), state["history"], leaks,
                            count_masked(keeper.masks), seconds, opt.imgsz, hyp, warmup, keeper.model,
                            keeper.ema.ema if keeper.ema is not None else None, keeper.masks)
    if result.leaked:
        raise PruneError(f"fine-tune {result.save_dir}: pruned weights became non-zero ({leaks})")
    return result


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
        res = prune_model(k.model, target, data_free_method(c), c.include, c.exclude, log=False)
        if [id(m.weight) for _, m in conv_layers(k.model, c.include, c.exclude)] != before:
            raise PruneError("schedule: pruning replaced the model's weight tensors; the optimizer would lose them")
        k.set_masks(zero_masks(k.model, c.include, c.exclude))
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
        """Remove the optimizer hooks and the candidate file (also after a crash)."""
        self.keeper.remove_hooks()
        if self.candidate is not None and self.candidate.exists():
            self.candidate.unlink()


def check_recovery(config: PruneConfig, opt: Any = None) -> None:
    """Checks of the recovery modes that need the run's context (raise :class:`ConfigError` before any epoch).

    A channel schedule's own checks are :func:`~yolo_prune_plugin.channel_schedule.check_channel_schedule` (the
    callers run both; channel_schedule imports this module)."""
    s = config.schedule
    if s.final_amount is not None:
        if config.method in DATA_AWARE_METHODS:
            raise ConfigError(f"schedule: method {config.method!r} is data-aware (20-60 s of calibration per "
                              "step); gradual pruning re-ranks every few epochs, use global, lamp or layerwise")
        epochs = (opt.get("epochs") if isinstance(opt, Mapping) else getattr(opt, "epochs", None)) if opt else None
        if epochs is not None and s.end_epoch >= int(epochs):
            raise ConfigError(f"schedule.end_epoch ({s.end_epoch}) must be < --epochs ({epochs}) so the final "
                              "sparsity is reached before training ends")
    if config.finetune.epochs and int(os.getenv("WORLD_SIZE", 1)) > 1:
        raise ConfigError("finetune: masked fine-tuning runs a second single-process training and cannot run "
                          "under DDP; prune and fine-tune after the DDP run (finetune.epochs: 0 here)")


__all__ = ["GradualPruning", "MaskKeeper", "FinetuneResult", "finetune_checkpoint", "cubic_sparsity",
           "schedule_amount", "is_step_epoch", "first_pruned_epoch", "zero_masks", "count_leaks", "file_leaks",
           "count_masked", "check_recovery", "FINETUNE_WARMUP"]
