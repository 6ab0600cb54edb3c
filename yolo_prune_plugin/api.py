"""Python API: train with the plugin, prune an existing checkpoint, and the pre-training checks."""

from __future__ import annotations

import argparse
import logging
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping, Optional

from . import pipeline
from .backend.checks import check_device, check_model_matches_data
from .backend.evaluation import backend_select_device, make_settings, resolve_data
from .backend.loading import Backend, get_backend, load_checkpoint
from .backend.patches import driving_yolov5
from .backend.training_loop import train_opt
from .callbacks import PrunePlugin, register
from .config import PruneConfig, config_from_dict, load_config
from .errors import CheckpointError, ConfigError
from .prune.unstructured import check_scope
from .report import ReportEntry
from .tools.heldout import calibration_needs, overlap_plan

LOGGER = logging.getLogger("yolo_prune_plugin")

# names YOLOv5 downloads from its release assets when not found locally
_RELEASE_WEIGHTS = re.compile(r"^yolov5[nsmlx]6?(-seg|-cls)?\.pt$")

__all__ = ["train", "prune", "register", "PrunePlugin", "preflight", "train_opt"]


def _resolve_weights(weights: str) -> str:
    if not weights or not weights.endswith(".pt") or weights.startswith(("http:/", "https:/")):
        return weights
    p = Path(weights).expanduser()
    if p.is_file():
        return str(p.resolve())  # a relative path would make YOLOv5 ask the Hugging Face hub
    if p.is_dir():
        raise CheckpointError(f"{p}: is a directory (--weights expects a YOLOv5 .pt checkpoint file)")
    if _RELEASE_WEIGHTS.match(weights):
        return weights  # YOLOv5 downloads its own release files
    raise CheckpointError(f"{p}: no such file (--weights expects a YOLOv5 .pt checkpoint)")


def check_model_config(model: Any, config: PruneConfig, source: str) -> None:
    """The checks shared by train and prune: include/exclude against the real model, export extras present."""
    if model is not None:
        check_scope(model, config.include, config.exclude, source=source)
    if config.export:
        from .backend.export import check_export_requirements

        check_export_requirements(config.export, simplify=config.export_options.simplify)
    from .tools.budget_run import check_target

    check_target(config, model)


def preflight(opt: argparse.Namespace, config: PruneConfig, backend: Optional[Backend] = None) -> None:
    """Every check that can fail at train end, done before the first epoch. Normalises paths in ``opt``."""
    backend = backend or get_backend()
    if getattr(opt, "evolve", None):
        raise ConfigError("--evolve: hyperparameter evolution replaces YOLOv5's callbacks between generations; "
                          "prune the evolved best.pt afterwards with `yolo-prune prune`")
    if getattr(opt, "resume", False):
        if config.structure == "channel" and config.schedule.final_amount is not None:
            from .training.channel_schedule import check_channel_schedule

            check_channel_schedule(config, opt)  # refuses --resume (YOLOv5 would rebuild the dense YAML)
        return  # YOLOv5 restores opt from the run; the hook reads it from the checkpoint
    data_path = str(opt.data)
    if not data_path.startswith(("http:/", "https:/")):
        p = Path(data_path).expanduser()
        if not p.is_file():
            raise ConfigError(f"--data {data_path}: data YAML not found")
        opt.data = str(p.resolve())
    data = resolve_data(opt.data, backend)
    opt.weights = _resolve_weights(str(opt.weights))
    if opt.weights.endswith(".pt") and Path(opt.weights).is_file():
        model = load_checkpoint(opt.weights, backend)
        model = model.get("ema") or model["model"]
    elif opt.cfg:
        model = backend.yolo.Model(opt.cfg, ch=3, nc=1 if opt.single_cls else int(data["nc"]))
    else:
        model = None
    check_model_config(model, config, source="--prune-include/--prune-exclude")
    if calibration_needs(config) or config.schedule.final_amount is not None:
        train_dir = data.get("train")
        if not train_dir:
            raise ConfigError(f"{opt.data}: no 'train' split for calibration images")
    # train and val sharing images: an explicit choice that needs them disjoint fails now, a fallback is said now
    overlap_plan(config, data)
    if config.method == "auto" and config.structure == "unstructured" and config.schedule.final_amount is None:
        from .prune.calibration import resolve_method

        # said before the first epoch, so a user whose train and val overlap learns it now, not after training
        LOGGER.info("yolo_prune_plugin: method %s", resolve_method(config.method, data, config.calibration.images,
                                                                   config.calibration.allow_overlap)[1])
    from .training.finetune import check_recovery

    check_recovery(config, opt)
    if config.structure == "channel" and config.schedule.final_amount is not None:
        from .training.channel_schedule import check_channel_schedule

        check_channel_schedule(config, opt)


def train(prune: PruneConfig | Mapping[str, Any] | str | Path | None = None, callbacks: Any = None,
          yolov5_dir: Optional[str] = None, **train_kwargs: Any) -> PrunePlugin | None:
    """Run YOLOv5's real training (``train.main``) with the pruning hook registered.

    ``prune`` is a :class:`PruneConfig`, a dict of config keys, or a YAML path; ``None`` trains without
    pruning. ``train_kwargs`` are YOLOv5 train options (``data=``, ``weights=``, ``epochs=``, ...).
    Returns the plugin (its ``entries``, ``report_path`` and ``error``), or None without pruning.
    """
    backend = get_backend(yolov5_dir)
    opt = train_opt([], backend, **train_kwargs)
    config: Optional[PruneConfig]
    if prune is None or isinstance(prune, PruneConfig):
        config = prune
    elif isinstance(prune, Mapping):
        config = config_from_dict(prune, source="prune=")
    else:
        config = load_config(prune)
    return run_training(opt, config, backend, callbacks)


def run_training(opt: argparse.Namespace, config: Optional[PruneConfig], backend: Backend,
                 callbacks: Any = None) -> PrunePlugin | None:
    """Preflight, :func:`register` and run ``train.main`` with a fresh ``Callbacks`` (never 7.0.14's shared default).

    The same ``register`` as the README's three-line path; YOLOv5 runs inside
    :func:`~yolo_prune_plugin.backend.patches.driving_yolov5`, whose patches are undone when ``train.main``
    returns or raises.
    """
    callbacks = callbacks if callbacks is not None else backend.Callbacks()
    plugin = None
    if config is not None:
        preflight(opt, config, backend)
        plugin = register(callbacks, config, opt=None if opt.resume else opt)
    else:
        if not str(opt.data).startswith(("http:/", "https:/")) and Path(str(opt.data)).is_file():
            opt.data = str(Path(str(opt.data)).resolve())
        opt.weights = _resolve_weights(str(opt.weights))
    with driving_yolov5(backend), _architecture_of(opt, backend):
        backend.train.main(opt, callbacks=callbacks)
    return plugin


def _architecture_of(opt: argparse.Namespace, backend: Backend) -> Any:
    """``--weights`` holding a channel-pruned model: YOLOv5 must train that architecture, not rebuild its YAML
    (which would silently re-initialise every pruned layer)."""
    w = str(getattr(opt, "weights", "") or "")
    if getattr(opt, "resume", False) or not w.endswith(".pt") or not Path(w).is_file():
        return nullcontext()
    from .backend.training_loop import is_channel_pruned, keep_checkpoint_architecture

    ckpt = load_checkpoint(w, backend)
    if not is_channel_pruned(ckpt.get("ema") or ckpt["model"], backend):
        return nullcontext()
    LOGGER.info("yolo_prune_plugin: %s is channel-pruned: training its own architecture (not %s)", Path(w).name,
                opt.cfg or "its YAML")
    return keep_checkpoint_architecture(backend, w)


def prune(weights: str | Path, data: str | Path | None = None, config: PruneConfig | None = None,
          imgsz: int = 640, batch_size: Optional[int] = None, device: str = "", workers: int = 8,
          single_cls: bool = False, report_dir: str | Path | None = None, **overrides: Any) -> list[ReportEntry]:
    """Prune an existing checkpoint (same code path as the train-end hook); returns the report entries.

    Without ``data`` nothing is evaluated (and data-aware methods and fine-tuning are unavailable).
    ``finetune={"epochs": N, ...}`` (or ``finetune:`` in the config) fine-tunes the pruned model in YOLOv5's own
    ``train.main`` on the data's train split, with the checkpoint's saved training options
    (:func:`~yolo_prune_plugin.training.finetune.checkpoint_train_options`). ``batch_size``: the validation batch
    (default 32, as val.py) and, when given, the fine-tune's training batch (default: the checkpoint's run).
    """
    check_device(device)
    backend = get_backend()
    cfg = config or load_config()
    if overrides:
        cfg = cfg.with_overrides(**overrides)
    weights = Path(weights).expanduser().resolve()
    ckpt = load_checkpoint(weights, backend)
    check_model_config(ckpt.get("ema") or ckpt["model"], cfg, source="include/exclude")
    settings = None
    if data is not None:
        settings = make_settings(data, imgsz, batch_size or 32, device, single_cls, workers, backend)
        check_model_matches_data(ckpt.get("ema") or ckpt["model"], settings.data, weights, data, single_cls)
    elif calibration_needs(cfg):
        raise ConfigError(f"{' and '.join(calibration_needs(cfg))} need(s) train-split images: pass --data")
    elif cfg.target.active:
        raise ConfigError("target: the budget search evaluates every candidate on the val split: pass --data")
    if cfg.schedule.final_amount is not None:
        raise ConfigError("schedule: gradual pruning prunes during a training run: use `yolo-prune train` (or "
                          "register() + train.main); `yolo-prune prune` prunes once (finetune: to train afterwards)")
    opt: dict = {}
    if cfg.finetune.epochs:
        from .training.finetune import check_recovery, checkpoint_train_options

        if data is None:
            raise ConfigError("finetune.epochs: the fine-tune trains on the data's train split: pass --data")
        if not settings.data.get("train"):
            raise ConfigError(f"{data}: no 'train' split to fine-tune on (finetune.epochs: {cfg.finetune.epochs})")
        opt = checkpoint_train_options(ckpt, data, imgsz, batch_size, device, workers, single_cls)
        check_recovery(cfg, opt)
    dev = settings.device if settings is not None else backend_select_device(backend, device)  # YOLOv5's names
    ctx = pipeline.RunContext(backend, dev, imgsz, settings, opt)
    with driving_yolov5(backend):
        entry = pipeline.run(weights, cfg, ctx, ckpt=ckpt)
        pipeline.write_report([entry], cfg, report_dir or weights.parent)
    pipeline.check_exports([entry])
    return [entry]
