"""Recovery inside YOLOv5's own training loop: masked fine-tuning after pruning, and gradual pruning.

Two modes, chosen by the config (they are mutually exclusive):

``finetune.epochs > 0`` (:class:`FinetunePlugin`)
    At train end ``best.pt`` is pruned one-shot exactly as :class:`~yolo_prune_plugin.callbacks.PrunePlugin`
    does (``best_pruned.pt`` + report). Then YOLOv5's ``train.main`` runs again on that file for ``epochs``
    epochs (run folder ``<run>_finetune`` beside the run, ``lr0`` and ``warmup_bias_lr`` times ``lr_scale``,
    same data and options) while the pruned positions are held at exactly zero. The fine-tuned best
    replaces ``best_pruned.pt`` atomically (fp16, ``ema`` None, ``prune`` entry extended with a
    ``finetune`` section). The second training runs *after* ``train.main`` returns when the plugin is used
    as a context manager (``api.run_training`` does): the first run's model, optimizer, dataloaders and
    loggers are gone by then. Without ``with``, it runs nested inside ``on_train_end``.

``schedule.final_amount`` set (:class:`SchedulePlugin`)
    Sparsity rises during training along the cubic schedule of Zhu & Gupta (2017),
    ``s_e = s_f * (1 - (1 - (e - start) / (end - start))^3)``, updated at the start of every ``every``-th
    epoch from ``start_epoch`` (and at ``end_epoch``), re-ranked each step with the configured score method
    (``global``, ``layerwise`` or ``lamp`` via :func:`~yolo_prune_plugin.pruning.prune_model` on the live
    model; the data-aware ``obs`` is rejected: it costs 20-60 s of calibration per step). Pruned weights never
    come back (zero weights rank lowest, so masks only grow). YOLOv5's ``best.pt`` is its fitness pick over
    *all* epochs, which with a rising sparsity is often a denser early epoch; so the plugin keeps its own
    pick among the epochs at the final sparsity (``epoch >= end_epoch``, highest fitness, ties: earliest) and
    writes that as ``best_pruned.pt`` (EMA weights, exactly ``final_amount`` sparse) with the report.

How zeros are kept exact without pruning re-parametrisation: callbacks never see the optimizer or the EMA,
so while ``train()`` builds them (between ``on_pretrain_routine_start`` and ``on_train_start``) the
module-level names ``smart_optimizer``, ``ModelEMA`` and ``smart_resume`` of YOLOv5's ``train`` module are
wrapped to capture the objects, then restored. A step pre-hook on the optimizer zeroes the gradients of
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

import datetime as _dt
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import yaml

from . import __version__
from .adapter import Backend, get_backend, load_checkpoint
from .callbacks import HOOK_NAME, PrunePlugin, is_main_process
from .config import DATA_AWARE_METHODS, PruneConfig, ScheduleOptions, load_config
from .errors import ConfigError, PruneError
from .evaluation import Metrics, backend_select_device, make_settings, evaluate_weights
from .pruning import conv_layers, prune_model, sparsity_stats
from .report import atomic_path
from .runner import check_exports, check_output_free, output_path, write_report

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
    """Captures YOLOv5's model, optimizer and EMA while ``train()`` builds them, and keeps masked weights zero.

    Use :meth:`install` at ``on_pretrain_routine_start`` and :meth:`uninstall` at ``on_train_start`` (and in a
    ``finally``). ``initial`` decides the masks set when the optimizer is created: a :data:`Masks` dict, or
    ``"zeros"`` (the live model's zeros in scope), or None (no mask until :meth:`set_masks`).
    ``warmup=False`` replaces YOLOv5's lr/momentum warmup by the scheduled values (see module docstring).
    """

    _ATTRS = ("smart_optimizer", "ModelEMA", "smart_resume")

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
        self._originals: dict[str, Any] = {}
        self._wrappers: dict[str, Any] = {}
        self._base_momentum: list[Optional[float]] = []
        self._scheduled_lr: Optional[list[float]] = None

    # -- capture ------------------------------------------------------------------------------------
    def install(self) -> None:
        """Wrap ``train.smart_optimizer``, ``train.ModelEMA`` and ``train.smart_resume`` (idempotent)."""
        if self._originals:
            return
        t = self.backend.train
        missing = [a for a in self._ATTRS if not hasattr(t, a)]
        if missing:
            raise PruneError(f"{t.__name__}: this YOLOv5 version has no {', '.join(missing)}; recovery modes "
                             "need YOLOv5 7.0.x's train.py")
        orig = {a: getattr(t, a) for a in self._ATTRS}
        keeper = self

        def smart_optimizer(model: nn.Module, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
            optimizer = orig["smart_optimizer"](model, *args, **kwargs)
            keeper._capture_optimizer(model, optimizer)
            return optimizer

        def model_ema(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
            ema = orig["ModelEMA"](model, *args, **kwargs)
            keeper.ema = ema
            return ema

        def smart_resume(ckpt: Any, optimizer: Any, ema: Any = None, *args: Any, **kwargs: Any) -> Any:
            out = orig["smart_resume"](ckpt, optimizer, ema, *args, **kwargs)
            keeper.start_epoch, keeper.resumed = int(out[1]), True
            return out

        self._originals = orig
        self._wrappers = {"smart_optimizer": smart_optimizer, "ModelEMA": model_ema, "smart_resume": smart_resume}
        for a, f in self._wrappers.items():
            f._yolo_prune_keeper = self  # type: ignore[attr-defined]
            setattr(t, a, f)

    def uninstall(self) -> None:
        """Restore YOLOv5's names (only those still holding this keeper's wrappers)."""
        t = self.backend.train
        for a, f in self._wrappers.items():
            if getattr(t, a, None) is f:
                setattr(t, a, self._originals[a])
            else:
                LOGGER.warning("yolo_prune_plugin: train.%s was replaced by someone else meanwhile; left as is", a)
        self._originals, self._wrappers = {}, {}

    def _capture_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
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
                        **train_overrides: Any) -> FinetuneResult:
    """Train ``weights`` for ``epochs`` more epochs with YOLOv5's ``train.main``, holding ``masks`` at zero.

    ``base_opt`` (a YOLOv5 train ``opt`` or its ``vars``) gives data, batch size, device, optimizer, hyp, ...;
    ``masks``: ``"zeros"`` (the checkpoint's zero Conv2d weights in scope), a :data:`Masks` dict, or None
    (dense fine-tune, e.g. a baseline). ``train_overrides`` are further YOLOv5 options. The run goes to
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

    def pretrain_start() -> None:
        keeper.install()

    def train_start() -> None:
        keeper.uninstall()
        if not keeper.captured:
            raise PruneError("could not capture YOLOv5's optimizer (train.smart_optimizer was not called)")

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
    for hook, fn in (("on_pretrain_routine_start", pretrain_start), ("on_train_start", train_start),
                     ("on_train_epoch_start", keeper.epoch_start),
                     ("on_train_batch_end", lambda *a, **k: keeper.batch_end()), ("on_fit_epoch_end", fit_epoch_end),
                     ("on_model_save", model_save), ("on_train_end", train_end)):
        cb.register_action(hook, name=HOOK_NAME, callback=fn)
    LOGGER.info("yolo_prune_plugin: fine-tuning %s for %d epochs (lr0 %.4g, %s masked weights, warmup %s)",
                weights.name, epochs, hyp["lr0"], "no" if not masks else "the pruned", "on" if warmup else "off")
    t0 = time.perf_counter()
    try:
        b.train.main(opt, callbacks=cb)
    finally:
        keeper.uninstall()
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
# plugins
# ---------------------------------------------------------------------------------------------------
def _stripped(ckpt: dict, model: nn.Module) -> dict:
    """A checkpoint as YOLOv5's ``strip_optimizer`` leaves it, holding ``model`` in fp16."""
    model = model.half()
    for p in model.parameters():
        p.requires_grad_(False)
    new = {k: v for k, v in ckpt.items() if k not in ("model", "ema", "optimizer", "updates", "best_fitness")}
    new.update(model=model, ema=None, optimizer=None, updates=None, best_fitness=None, epoch=-1)
    return new


class _RecoveryPlugin(PrunePlugin):
    """Shared parts of both modes; a context manager around ``train.main``."""

    mode = ""

    def __init__(self, config: PruneConfig, opt: Any = None, backend: Optional[Backend] = None,
                 warmup: bool = FINETUNE_WARMUP):
        super().__init__(config, opt=opt, backend=backend)
        self.warmup = warmup
        self.history: list[dict] = []
        self._entered = False

    def __enter__(self) -> "_RecoveryPlugin":
        self._entered = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self._entered = False
        self._cleanup()
        if exc_type is None:
            self.finish()
        return False

    def _cleanup(self) -> None:
        pass

    def finish(self) -> None:
        """Work deferred until ``train.main`` returned (called by ``__exit__``)."""

    def _fail(self, e: BaseException, what: str) -> None:
        self.error = e
        LOGGER.error("yolo_prune_plugin: %s failed: %s", what,
                     e if isinstance(e, PruneError) else f"{type(e).__name__}: {e}")
        if not isinstance(e, PruneError):
            LOGGER.debug("traceback", exc_info=True)

    def _settings(self, opt: dict, device: Any) -> Any:
        world = int(os.getenv("WORLD_SIZE", 1))
        batch = max(int(opt.get("batch_size", 16)) // world * 2, 1)
        return make_settings(opt["data"], int(opt.get("imgsz", 640)), batch, device,
                             bool(opt.get("single_cls", False)), int(opt.get("workers", 8)),
                             self.backend or get_backend())

    def _export(self, entry: dict, device: Any) -> None:
        if not self.config.export:
            return
        from .export import export_and_verify

        o = self.config.export_options
        dev = str(device.index) if getattr(device, "type", "cpu") == "cuda" else "cpu"
        arts = export_and_verify(Path(entry["output"]), self.config.export, imgsz=int(entry.get("imgsz", 640)),
                                 device=dev, half=o.half, dynamic=o.dynamic, simplify=o.simplify, opset=o.opset,
                                 atol=o.atol, overwrite=True)
        entry["exports"] = [a.to_dict() for a in arts]


class FinetunePlugin(_RecoveryPlugin):
    """Prune ``best.pt`` at train end, then fine-tune ``best_pruned.pt`` with the pruned weights held at zero."""

    mode = "finetune"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.finetune: Optional[FinetuneResult] = None
        self._pending = False

    def on_train_end(self, last: Any, best: Any, epoch: int, results: Any) -> None:
        if not is_main_process():
            return
        config = self.config
        self.config = replace(config, export=())  # export the fine-tuned file, not the one-shot one
        try:
            super().on_train_end(last, best, epoch, results)
        finally:
            self.config = config
        if self.error is None and self.entries:
            self._pending = True
            if not self._entered:  # plain register() + train.main: no later chance, fine-tune now
                self.finish()

    def finish(self) -> None:
        if not self._pending:
            return
        self._pending = False
        try:
            self._finetune(self.entries[0])
        except Exception as e:  # noqa: BLE001 - best.pt, last.pt and the one-shot best_pruned.pt stay
            self._fail(e, "masked fine-tuning after pruning")

    def _finetune(self, entry: dict) -> None:
        b = self.backend or get_backend()
        c = self.config
        ft_cfg = c.finetune
        out = Path(entry["output"])
        run_dir = Path(entry["checkpoint"]).parent.parent
        opt = getattr(self, "_resolved_opt", None) or self._opt(Path(entry["checkpoint"]), Path(entry["checkpoint"]))
        oneshot = load_checkpoint(out, b)
        masks = zero_masks(oneshot["model"], c.include, c.exclude)
        prune_info = dict(oneshot.get("prune") or {})
        del oneshot
        ft = finetune_checkpoint(out, opt, ft_cfg.epochs, lr_scale=ft_cfg.lr_scale, imgsz=ft_cfg.imgsz,
                                 include=c.include, exclude=c.exclude, masks=masks, warmup=self.warmup,
                                 project=run_dir.parent, name=f"{run_dir.name}_finetune",
                                 hyp_path=run_dir / "hyp_finetune.yaml", backend=b)
        ft.model = ft.ema_model = None  # let the training objects go
        self.finetune = ft
        self.history = ft.history

        ckpt = load_checkpoint(ft.best, b)
        model = (ckpt.get("ema") or ckpt["model"]).float()
        leaks = dict(ft.leaks)
        leaks["best_pruned.pt"] = count_leaks(model, masks)
        layers = conv_layers(model, c.include, c.exclude)
        new = _stripped(ckpt, model)
        after = sparsity_stats(model, layers)
        entry["metrics_oneshot"] = entry.get("metrics_after")
        entry["sparsity_after"] = after.to_dict(per_layer=True)
        entry["sparsity_all_conv"] = sparsity_stats(model).to_dict(per_layer=False)
        entry["finetune"] = {"epochs": ft_cfg.epochs, "lr_scale": ft_cfg.lr_scale, "imgsz": ft.imgsz,
                             "warmup": ft.warmup, "lr0": ft.hyp["lr0"], "run": str(ft.save_dir),
                             "source": str(ft.best), "masked_weights": count_masked(masks), "leaks": leaks,
                             "seconds": round(ft.seconds, 1), "history": ft.history}
        if sum(leaks.values()):
            entry["metrics_after"] = None
            self.report_path = write_report(self.entries, c, run_dir, extra={"mode": self.mode,
                                                                             "history": ft.history})
            raise PruneError(f"{ft.best}: pruned weights became non-zero during fine-tuning ({leaks}); "
                             f"{out} still holds the one-shot pruned model")
        device = backend_select_device(b, opt.get("device", ""), 0)
        new["prune"] = {**prune_info, "version": __version__, "config": c.to_dict(),
                        "date": _dt.datetime.now().isoformat(timespec="seconds")}
        with atomic_path(out) as tmp:
            torch.save(new, tmp)
            if c.evaluate:
                same = ft.imgsz == int(opt.get("imgsz", 640)) and ft.results is not None and ft.best.name == "best.pt"
                if same:  # YOLOv5's final validation of the fine-tune's best.pt: the same weights, same settings
                    entry["metrics_after"] = Metrics.from_results(ft.results).to_dict()
                else:
                    LOGGER.info("Validating %s (after fine-tuning)...", out.name)
                    entry["metrics_after"] = evaluate_weights(tmp, self._settings(opt, device), backend=b).to_dict()
            new["prune"].update(entry)
            torch.save(new, tmp)
        final = load_checkpoint(out, b)
        leaks["best_pruned.pt"] = count_leaks(final["model"], masks)
        if leaks["best_pruned.pt"]:
            raise PruneError(f"{out}: pruned weights non-zero after saving ({leaks['best_pruned.pt']})")
        LOGGER.info("Saved %s (one-shot pruned, then fine-tuned %d epochs in %s)", out, ft_cfg.epochs, ft.save_dir)
        entry["imgsz"] = int(opt.get("imgsz", 640))
        self._export(entry, device)
        self.report_path = write_report(self.entries, c, run_dir, extra={"mode": self.mode, "history": ft.history},
                                        echo=LOGGER.info)
        check_exports(self.entries)


class SchedulePlugin(_RecoveryPlugin):
    """Gradual pruning during training along the cubic schedule; writes ``best_pruned.pt`` at train end."""

    mode = "schedule"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        c = self.config
        self.keeper = MaskKeeper(self.backend or get_backend(), c.include, c.exclude, initial=None, warmup=True)
        self.steps: list[dict] = []
        self._epoch = 0
        self._best: Optional[tuple[int, float]] = None
        self._candidate: Optional[Path] = None
        self._dense_stats: Optional[dict] = None
        self._saved_leaks = 0

    def _cleanup(self) -> None:
        self.keeper.uninstall()
        if self._candidate is not None and self._candidate.exists():
            self._candidate.unlink()  # training crashed after a candidate was saved

    # -- hooks ---------------------------------------------------------------------------------------
    def on_pretrain_routine_start(self) -> None:
        self.keeper.install()

    def on_train_start(self) -> None:
        k = self.keeper
        k.uninstall()
        if not k.captured:
            raise PruneError("schedule: could not capture YOLOv5's optimizer (train.smart_optimizer was not "
                             "called); gradual pruning needs YOLOv5 7.0.x's train.py")
        c = self.config
        layers = conv_layers(k.model, c.include, c.exclude)
        self._epoch = k.start_epoch
        if k.resumed:  # the resumed weights already carry the zeros of the earlier epochs
            k.set_masks(zero_masks(k.model, c.include, c.exclude))
        else:
            self._dense_stats = sparsity_stats(k.model, layers).to_dict(per_layer=False)

    def on_train_epoch_start(self) -> None:
        k, s = self.keeper, self.config.schedule
        epoch = self._epoch
        self._epoch += 1
        k.epoch_start()
        if not is_step_epoch(epoch, s) or self.error is not None:
            return
        try:
            self._step(epoch)
        except Exception as e:  # noqa: BLE001 - never kill the training run; reported at train end
            self._fail(e, f"gradual pruning step at epoch {epoch}")

    def _step(self, epoch: int) -> None:
        k, s = self.keeper, self.config.schedule
        target = schedule_amount(epoch, s)
        if target <= 0:
            return
        c = self.config
        before = [id(m.weight) for _, m in conv_layers(k.model, c.include, c.exclude)]
        res = prune_model(k.model, target, c.method, c.include, c.exclude, log=False)
        if [id(m.weight) for _, m in conv_layers(k.model, c.include, c.exclude)] != before:
            raise PruneError("schedule: pruning replaced the model's weight tensors; the optimizer would lose them")
        k.set_masks(zero_masks(k.model, c.include, c.exclude))
        step = {"epoch": epoch, "target": round(target, 6), "zeros": res.after.zeros, "weights": res.after.weights,
                "sparsity": round(res.after.sparsity, 6), "masked": count_masked(k.masks),
                "seconds": round(res.seconds, 3)}
        self.steps.append(step)
        if is_main_process():
            LOGGER.info("yolo_prune_plugin: epoch %d: pruned to %.2f%% (target %.2f%%, %s, %.2fs)", epoch,
                        100 * res.after.sparsity, 100 * target, c.method, res.seconds)

    def on_fit_epoch_end(self, log_vals: Any, epoch: int, best_fitness: Any, fi: Any) -> None:
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

    def on_model_save(self, last: Any, epoch: int, final_epoch: Any, best_fitness: Any, fi: Any) -> None:
        if not is_main_process():
            return
        epoch = int(epoch)
        try:
            if self.keeper.masks:
                n = sum(file_leaks(last, self.keeper.masks, self.backend).values())
                self._saved_leaks += n
                for r in self.history:
                    if r["epoch"] == epoch:
                        r["leaked_saved"] = n
            if epoch < self.config.schedule.end_epoch:
                return  # not at the final sparsity yet: never a candidate for best_pruned.pt
            f = _scalar(fi)
            if self._best is None or f > self._best[1]:
                cand = Path(last).with_name(".best_pruned_candidate.pt")
                with atomic_path(cand) as tmp:
                    shutil.copyfile(last, tmp)
                self._candidate, self._best = cand, (epoch, f)
        except Exception as e:  # noqa: BLE001 - never kill the training run; reported at train end
            if self.error is None:
                self._fail(e, f"schedule bookkeeping at epoch {epoch}")

    def on_train_end(self, last: Any, best: Any, epoch: int, results: Any) -> None:
        if not is_main_process():
            return
        self.ran = True
        try:
            if self.error is not None:
                raise self.error
            self._finalize(Path(last), Path(best), int(epoch))
        except Exception as e:  # noqa: BLE001 - never kill a finished training run
            self._fail(e, "gradual pruning at train end")
        finally:
            if self._candidate is not None and self._candidate.exists():
                self._candidate.unlink()

    # -- work ----------------------------------------------------------------------------------------
    def _finalize(self, last: Path, best: Path, epoch: int) -> None:
        b = self.backend or get_backend()
        c, s = self.config, self.config.schedule
        k = self.keeper
        if self._candidate is None or not self._candidate.is_file():
            raise PruneError(f"training ended at epoch {epoch}, before schedule.end_epoch {s.end_epoch} reached "
                             f"the final sparsity {s.final_amount}; no pruned checkpoint was written")
        out = output_path(best, c)
        check_output_free(out, c, b)
        opt = self._opt(best, last)
        self._resolved_opt = opt
        run_dir = best.parent.parent
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
        cand = load_checkpoint(self._candidate, b)
        for n in ("model", "ema"):
            if isinstance(cand.get(n), nn.Module):
                leaks[f"epoch{self._best[0]}:{n}"] = count_leaks(cand[n], masks)
        model = (cand.get("ema") or cand["model"]).float()
        new = _stripped(cand, model)
        layers = conv_layers(model, c.include, c.exclude)
        after = sparsity_stats(model, layers)
        leaks["best_pruned.pt"] = count_leaks(model, masks)
        expected = (sum(int(round(float(s.final_amount) * n.weights)) for n in after.layers)
                    if c.method == "layerwise" else int(round(float(s.final_amount) * after.weights)))
        device = backend_select_device(b, opt.get("device", ""), 0)
        dense_epoch = s.start_epoch - 1
        before_row = next((r for r in self.history if r["epoch"] == dense_epoch), None)
        entry: dict[str, Any] = {
            "checkpoint": str(last), "output": str(out), "method": c.method, "amount": s.final_amount,
            "device": str(device), "mode": self.mode, "source_epoch": self._best[0],
            "source_fitness": round(self._best[1], 6), "imgsz": int(opt.get("imgsz", 640)),
            "sparsity_before": self._dense_stats or sparsity_stats(model, layers).to_dict(per_layer=False),
            "sparsity_after": after.to_dict(per_layer=True),
            "sparsity_all_conv": sparsity_stats(model).to_dict(per_layer=False),
            "masked_weights": count_masked(masks), "expected_zeros": expected,
            "metrics_before": ({m: before_row[m] for m in ("P", "R", "mAP50", "mAP50-95")}
                               if before_row and "mAP50" in before_row else None),
            "metrics_before_source": f"epoch {dense_epoch} (dense, training history)" if before_row else None,
            "metrics_after": None, "schedule": {**vars(s), "steps": self.steps}, "leaks": leaks,
            "yolov5_best_sparsity": yolo_best,
        }
        self.entries = [entry]
        extra = {"mode": self.mode, "history": self.history}
        if sum(leaks.values()) or count_masked(masks) < expected:
            self.report_path = write_report(self.entries, c, run_dir, extra=extra)
            raise PruneError(f"schedule: final masks hold {count_masked(masks)} weights (expected {expected}) or "
                             f"pruned weights leaked ({leaks}); {out} not written")
        new["prune"] = {"version": __version__, "config": c.to_dict(),
                        "date": _dt.datetime.now().isoformat(timespec="seconds"), **entry}
        with atomic_path(out) as tmp:
            torch.save(new, tmp)
            if c.evaluate:
                LOGGER.info("Validating %s (epoch %d, %.2f%% sparse)...", out.name, self._best[0],
                            100 * after.sparsity)
                entry["metrics_after"] = evaluate_weights(tmp, self._settings(opt, device), backend=b).to_dict()
                new["prune"].update(entry)
                torch.save(new, tmp)
        LOGGER.info("Saved %s (epoch %d of the gradual pruning run)", out, self._best[0])
        self._export(entry, device)
        self.report_path = write_report(self.entries, c, run_dir, extra=extra, echo=LOGGER.info)
        check_exports(self.entries)


RecoveryPlugin = _RecoveryPlugin


def check_recovery(config: PruneConfig, opt: Any = None) -> None:
    """Config checks of the recovery modes that :mod:`config` cannot do alone (raise :class:`ConfigError`)."""
    s = config.schedule
    if s.final_amount is not None:
        if config.method in DATA_AWARE_METHODS:
            raise ConfigError(f"schedule: method {config.method!r} is data-aware (20-60 s of calibration per "
                              "step); gradual pruning re-ranks every few epochs, use global, lamp or layerwise")
        if opt is not None and not isinstance(opt, Mapping) and getattr(opt, "epochs", None) is not None \
                and s.end_epoch >= int(opt.epochs):
            raise ConfigError(f"schedule.end_epoch ({s.end_epoch}) must be < --epochs ({opt.epochs}) so the final "
                              "sparsity is reached before training ends")
    if config.finetune.epochs and int(os.getenv("WORLD_SIZE", 1)) > 1:
        raise ConfigError("finetune: masked fine-tuning runs a second single-process training and cannot run "
                          "under DDP; prune and fine-tune after the DDP run (finetune.epochs: 0 here)")


def register(callbacks: Any, config: Optional[PruneConfig] = None, opt: Any = None,
             warmup: Optional[bool] = None, **overrides: Any) -> _RecoveryPlugin:
    """Register a recovery mode on YOLOv5 ``Callbacks`` and return the plugin (a context manager).

    ``config.finetune.epochs > 0``: :class:`FinetunePlugin`; ``config.schedule.final_amount`` set:
    :class:`SchedulePlugin`. Use it as ``with register(...) as plugin: train.main(opt, callbacks=callbacks)``
    so that YOLOv5's names patched while training starts are always restored and the fine-tune runs after
    the first training has released its memory.
    """
    cfg = config or load_config()
    if overrides:
        cfg = cfg.with_overrides(**overrides)
    check_recovery(cfg, opt)
    if cfg.schedule.final_amount is not None:
        plugin: _RecoveryPlugin = SchedulePlugin(cfg, opt=opt)
        hooks: tuple[str, ...] = ("on_pretrain_routine_start", "on_train_start", "on_train_epoch_start",
                                  "on_fit_epoch_end", "on_model_save", "on_train_end")
    elif cfg.finetune.epochs:
        plugin = FinetunePlugin(cfg, opt=opt, warmup=cfg.finetune.warmup if warmup is None else warmup)
        hooks = ("on_train_end",)
    else:
        raise ConfigError("recovery: set finetune.epochs > 0 or schedule.final_amount to use a recovery mode")
    for hook in hooks:
        callbacks.register_action(hook, name=HOOK_NAME, callback=getattr(plugin, hook))
    return plugin


__all__ = ["register", "FinetunePlugin", "SchedulePlugin", "RecoveryPlugin", "MaskKeeper", "FinetuneResult",
           "finetune_checkpoint", "cubic_sparsity", "schedule_amount", "is_step_epoch", "zero_masks",
           "count_leaks", "file_leaks", "check_recovery", "FINETUNE_WARMUP"]
