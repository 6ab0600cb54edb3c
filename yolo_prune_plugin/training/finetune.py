"""Fine-tuning a pruned checkpoint in YOLOv5's own ``train.main``, and the checks of every recovery mode.

``finetune.epochs > 0`` (:func:`finetune_checkpoint`, called by the pipeline after the one-shot prune):
YOLOv5's ``train.main`` runs again on the one-shot ``best_pruned.pt`` for ``epochs`` epochs (run folder
``<run>_finetune`` beside the run, ``lr0`` and ``warmup_bias_lr`` times ``lr_scale``, same data and
options) while the pruned positions are held at exactly zero (unstructured, :mod:`.masks`) or the pruned
architecture is kept (channel); the pipeline writes the fine-tuned best as ``best_pruned.pt``.

Fine-tune learning rate and steps: YOLOv5's warmup always lasts at least 100 iterations, starting every lr at 0
and the bias lr at ``warmup_bias_lr`` (0.1) while ``accumulate`` ramps from 1 to ``64 / batch_size`` (few
optimizer steps, few EMA updates), which is most or all of a short fine-tune. With ``warmup=False`` (the
default, :data:`FINETUNE_WARMUP`) the fine-tune's ``on_train_start`` switches the warm-up branch off and steps
once per batch (:func:`~yolo_prune_plugin.backend.training_loop.steady_training_loop`): every step runs at the
scheduled lr from the first batch and the EMA is updated after every batch (a step pre-hook also restores each
group's scheduled lr and momentum, as a safety net). Measured (before one step per batch) with ``scripts/benchmark_recovery.py`` (yolov5n, coco128 @ 320, 50% global,
mAP50-95 of one-shot 0.219, dense 0.291): lr_scale 0.1, 10 epochs: masked FT 0.283 without warmup vs
0.248 with it (with warmup the lr never leaves ~0, the gain is mostly BatchNorm re-estimation); lr_scale 1.0,
10 epochs, no warmup: 0.331 (dense fine-tuned alike: 0.320). A high lr without warmup needs epochs: at
lr_scale 1.0 the first 2-3 epochs collapse (0.10-0.15) before recovering.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import yaml

from ..backend.distillation import OOM_MESSAGE, distilled_loss
from ..backend.distributed import launched_distributed, single_process
from ..backend.loading import Backend, get_backend
from ..backend.patches import driving_yolov5
from ..backend.training_loop import keep_checkpoint_architecture, steady_training_loop, train_opt
from ..config import DATA_AWARE_METHODS, PruneConfig
from ..errors import ConfigError, PruneError
from ..options import FINETUNE_LR_SCHEDULES
from ..prune.unstructured import conv_layers, sparsity_stats
from .masks import MaskKeeper, Masks, count_masked, file_leaks
from .schedule import _scalar, history_row

LOGGER = logging.getLogger("yolo_prune_plugin")


#: Default for the fine-tune's learning-rate warmup (see the module docstring and the benchmark).
FINETUNE_WARMUP = False


#: Options of the original run that the fine-tune run does not inherit (it must not upload or resume).
_NOT_INHERITED = {"weights", "cfg", "hyp", "resume", "evolve", "epochs", "imgsz", "project", "name", "exist_ok",
                  "save_dir", "hf_model_id", "hf_token", "hf_private", "hf_dataset_id", "roboflow_upload",
                  "roboflow_token", "s3_upload_dir", "upload_dataset", "bucket", "local_rank",
                  "neptune_resume_id"}


# ---------------------------------------------------------------------------------------------------
# fine-tune with YOLOv5's train.main
# ---------------------------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    """What :func:`finetune_checkpoint` did."""

    save_dir: Path
    best: Path  # the file to keep (``keep``): last.pt, or best.pt (last.pt when YOLOv5 saved no best.pt)
    last: Path
    results: Optional[tuple]  # YOLOv5's final validation of best.pt (P, R, mAP50, mAP50-95, losses)
    history: list[dict]
    leaks: dict[str, int]  # live model/EMA at the end, every saved last.pt, final last.pt/best.pt
    masked: int
    seconds: float
    imgsz: int
    hyp: dict
    warmup: bool
    loop: dict = field(default_factory=dict)  # warm-up/accumulation set in YOLOv5's loop, EMA updates
    distill: Optional[dict] = None  # weight, teacher size, batches (None: no teacher)
    teacher: Optional[nn.Module] = field(default=None, repr=False)  # the live teacher after training (tests)
    model: Optional[nn.Module] = field(default=None, repr=False)  # the live training objects (tests)
    ema_model: Optional[nn.Module] = field(default=None, repr=False)
    masks: Masks = field(default_factory=dict, repr=False)
    kept: dict = field(default_factory=dict)  # which file was kept and why: file, rule, epochs of best.pt/last.pt

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


def checkpoint_train_options(ckpt: Mapping[str, Any], data: str | Path, imgsz: int, batch_size: Optional[int],
                             device: str, workers: int, single_cls: bool) -> dict:
    """YOLOv5 train options for fine-tuning an existing checkpoint (``yolo-prune prune --finetune-epochs``).

    The checkpoint's saved ``opt`` (``vars(opt)`` of the run that wrote it; hyp, optimizer, cos_lr, seed, ...)
    where present, YOLOv5's defaults otherwise (:func:`finetune_checkpoint` starts from ``parse_opt``); the
    command's data, image size, device, workers and single-class flag always apply, its batch size when given
    (else the run's, else YOLOv5's 16). YOLOv5's ``train.py`` saves ``hyp`` as a dict.
    """
    saved = ckpt.get("opt")
    base = _as_dict(saved) if isinstance(saved, Mapping) or hasattr(saved, "__dict__") else {}
    base.update(data=str(Path(data).expanduser().resolve()), imgsz=int(imgsz), device=device, workers=int(workers),
                single_cls=bool(single_cls), batch_size=int(batch_size or base.get("batch_size") or 16))
    return base


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
                        keep_architecture: bool = False, teacher: Optional[nn.Module] = None,
                        distill_weight: float = 1.0, distill_features: float = 0.0,
                        hooks: Sequence[tuple[str, Callable[..., Any]]] = (),
                        keep: str = "best", lr_schedule: str = "run", **train_overrides: Any) -> FinetuneResult:
    """Train ``weights`` for ``epochs`` more epochs with YOLOv5's ``train.main``, holding ``masks`` at zero.

    ``base_opt`` (a YOLOv5 train ``opt`` or its ``vars``) gives data, batch size, device, optimizer, hyp, ...;
    ``masks``: ``"zeros"`` (the checkpoint's zero Conv2d weights in scope), a :data:`Masks` dict, or None
    (dense fine-tune, e.g. a baseline). ``keep_architecture``: train the module stored in ``weights`` (a
    channel-pruned model) instead of YOLOv5 rebuilding its YAML. ``teacher``: the dense model to distil from
    (:mod:`~yolo_prune_plugin.backend.distillation`, weight ``distill_weight``, feature term ``distill_features``;
    None: YOLOv5's loss alone, the loop untouched). ``hooks``: further ``(YOLOv5 callback name, function)`` pairs
    registered after the plugin's own
    (e.g. the penalty phase's regulariser). ``keep``: ``"best"`` (YOLOv5's best.pt, its fitness on the data's val
    split) or ``"last"`` (the last epoch); ``lr_schedule``: ``"run"`` (``base_opt``'s ``cos_lr``), ``"linear"`` or
    ``"cosine"`` (YOLOv5's ``cos_lr``). ``train_overrides`` are further YOLOv5 options. The run goes to
    ``project/name`` (never overwriting: YOLOv5 increments the name). Raises :class:`PruneError` on a leak.
    """
    b = backend or get_backend()
    weights = Path(weights).expanduser().resolve()
    base = _as_dict(base_opt)
    if epochs < 1:
        raise ConfigError(f"finetune.epochs must be >= 1, got {epochs}")
    if keep not in ("best", "last"):
        raise ConfigError(f"finetune.keep must be one of best, last, got {keep!r}")
    if lr_schedule not in FINETUNE_LR_SCHEDULES:
        raise ConfigError(f"finetune.lr_schedule must be one of {', '.join(FINETUNE_LR_SCHEDULES)}, got {lr_schedule!r}")
    hyp = finetune_hyp(load_hyp(base.get("hyp"), b), lr_scale, warmup)
    opt = train_opt([], b)  # YOLOv5's defaults, never the host process's sys.argv
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
    if lr_schedule != "run":
        opt.cos_lr = lr_schedule == "cosine"
    for k, v in train_overrides.items():
        if not hasattr(opt, k):
            raise ConfigError(f"finetune: unknown YOLOv5 train option {k!r}")
        setattr(opt, k, v)
    if isinstance(masks, Mapping):
        masks = {n: m.cpu().bool() for n, m in masks.items()}

    keeper = MaskKeeper(b, include, exclude, initial=masks, warmup=warmup)
    state: dict[str, Any] = {"history": [], "saved_leaks": 0, "distill": None}

    def train_start() -> None:
        keeper.capture()
        if not warmup:
            state["loop"] = steady_training_loop()

    def fit_epoch_end(log_vals: Any, epoch: int, best_fitness: Any, fi: Any) -> None:
        if any(r["epoch"] == int(epoch) for r in state["history"]):
            return  # COCO's extra call after the final validation
        if _scalar(fi) == _scalar(best_fitness):  # YOLOv5 writes best.pt after this hook when fi == best_fitness
            state["best_epoch"] = int(epoch)
        row = history_row(log_vals, epoch, fi)
        live = keeper.leaks()
        row.update({"sparsity": round(sparsity_stats(keeper.model, conv_layers(keeper.model, include, exclude))
                                      .sparsity, 6), "leaked": live, "optimizer_steps": keeper.epoch_steps,
                    "step_lr": list(keeper.epoch_lr) if keeper.epoch_lr else None,
                    "epoch_s": round(time.perf_counter() - state.get("epoch_t0", t0), 2)})
        if state["distill"] is not None:
            row.update(state["distill"].epoch_means())
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

    def epoch_start() -> None:
        state["epoch_t0"] = time.perf_counter()
        keeper.epoch_start()
        if state["distill"] is not None:
            state["distill"].epoch_reset()

    cb = b.Callbacks()
    HOOK_NAME = "yolo_prune_plugin"
    for hook, fn in (("on_train_start", train_start),
                     ("on_train_epoch_start", epoch_start),
                     ("on_train_batch_end", lambda *a, **k: keeper.batch_end()), ("on_fit_epoch_end", fit_epoch_end),
                     ("on_model_save", model_save), ("on_train_end", train_end)):
        cb.register_action(hook, name=HOOK_NAME, callback=fn)
    for hook, fn in hooks:
        cb.register_action(hook, name=f"{HOOK_NAME}_extra", callback=fn)
    LOGGER.info("yolo_prune_plugin: fine-tuning %s for %d epochs (lr0 %.4g, %s masked weights, warmup %s%s)",
                weights.name, epochs, hyp["lr0"], "no" if not masks else "the pruned", "on" if warmup else "off",
                f", distilling from the dense model (weight {distill_weight:g})" if teacher is not None else "")
    t0 = time.perf_counter()
    try:
        with contextlib.ExitStack() as scope:
            scope.enter_context(driving_yolov5(b))
            if launched_distributed():  # after a DDP training: rank 0 fine-tunes alone, as one process
                opt.device = scope.enter_context(single_process(b)) or opt.device
            if keep_architecture:
                scope.enter_context(keep_checkpoint_architecture(b, weights))
            if teacher is not None:
                state["distill"] = scope.enter_context(
                    distilled_loss(b, teacher, distill_weight, distill_features))
            try:
                b.train.main(opt, callbacks=cb)
            except torch.cuda.OutOfMemoryError:
                if state["distill"] is None:
                    raise
                raise PruneError(OOM_MESSAGE.format(mb=state["distill"].teacher_mb)) from None
    finally:
        keeper.remove_hooks()
    seconds = time.perf_counter() - t0
    if "last" not in state:
        raise PruneError(f"fine-tune run {opt.save_dir} ended without on_train_end (stopped early?)")
    last, best = state["last"], state["best"]
    kept = last if keep == "last" or not best.is_file() else best
    if not kept.is_file():
        raise PruneError(f"fine-tune run {opt.save_dir} saved no checkpoint")
    last_epoch = max((r["epoch"] for r in state["history"]), default=None)
    kept_record = {"file": kept.name, "rule": keep, "last_epoch": last_epoch, "best_epoch": state.get("best_epoch"),
                   "epoch": last_epoch if kept == last else state.get("best_epoch")}
    leaks = {f"live_{k}": v for k, v in keeper.leaks().items()} if keeper.masks else {}
    if keeper.masks:
        leaks["saved_last_each_epoch"] = state["saved_leaks"]
        for f in dict.fromkeys((last, best)):
            if f.is_file():
                for k, v in file_leaks(f, keeper.masks, b).items():
                    leaks[f"{f.name}:{k}"] = v
    result = FinetuneResult(Path(opt.save_dir), kept, last, state.get("results"), state["history"], leaks,
                            count_masked(keeper.masks), seconds, opt.imgsz, hyp, warmup,
                            {**state.get("loop", {}), "ema_updates": getattr(keeper.ema, "updates", None)},
                            _distill_summary(state["distill"]), state["distill"] and state["distill"].teacher,
                            keeper.model,
                            keeper.ema.ema if keeper.ema is not None else None, keeper.masks, kept_record)
    if result.leaked:
        raise PruneError(f"fine-tune {result.save_dir}: pruned weights became non-zero ({leaks})")
    return result


def _distill_summary(stats: Any) -> Optional[dict]:
    if stats is None:
        return None
    return {"weight": stats.weight, "teacher_mb": round(stats.teacher_mb, 2), "batches": stats.batches,
            "features": stats.features, "feature_scale": stats.feature_scale, "feature_match": stats.feature_match,
            "feature_matched_by": stats.feature_matched_by,
            "teacher_dtype": str(next(stats.teacher.parameters()).dtype) if stats.teacher is not None else None}


def check_recovery(config: PruneConfig, opt: Any = None) -> None:
    """Checks of the recovery modes that need the run's context (raise :class:`ConfigError` before any epoch).

    A channel schedule's own checks are :func:`~yolo_prune_plugin.training.channel_schedule.check_channel_schedule` (the
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
