"""The pipeline's stages: prune a checkpoint's model (zeros or channels, recalibration / reconstruction) and
fine-tune it in YOLOv5's own loop; :mod:`yolo_prune_plugin.pipeline` runs them, evaluates, writes and reports."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from .backend.evaluation import EvalSettings
from .backend.loading import Backend, load_checkpoint
from .config import DATA_AWARE_METHODS, PruneConfig
from .errors import PruneError
from .prune.unstructured import conv_layers, prune_model, sparsity_stats
from .report import ReportEntry
from .tools.heldout import channel_data_needs, overlap_plan

LOGGER = logging.getLogger("yolo_prune_plugin")


@dataclass
class RunContext:
    """Where and how one pipeline run works: resolved once by the caller."""

    backend: Backend
    device: torch.device
    imgsz: int
    settings: Optional[EvalSettings] = None  # evaluation (and calibration) data; None: nothing evaluated
    opt: dict = field(default_factory=dict)  # YOLOv5 train options of the run (fine-tune inherits them)
    #: ``structure: channel``: the channels to remove, fixed by the run (``channel.regularize`` trained them away);
    #: None: ranked by the channel importance
    channel_plan: Optional[dict] = None
    #: where measured tables are cached (``channel.allocation: latency``: ``latency_<imgsz>.json``); None: not kept
    cache_dir: Optional[Path] = None

    @property
    def export_device(self) -> str:
        return str(self.device.index or 0) if self.device.type == "cuda" else "cpu"


# --------------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------------
def source_model(ckpt: Mapping[str, Any]) -> nn.Module:
    """The model YOLOv5 would deploy from a checkpoint: ``ema`` first, else ``model``."""
    return ckpt.get("ema") or ckpt["model"]


def prune_stage(ckpt: Mapping[str, Any], config: PruneConfig, ctx: RunContext,
                cache: Optional[dict] = None) -> tuple[nn.Module, dict]:
    """A float copy of the checkpoint's model on the run's device, pruned as ``config`` says (zeros, or channels
    removed), BatchNorm statistics re-estimated when configured. Returns the model and what was done.
    ``cache``: calibration images kept across calls (a budget search prunes many amounts)."""
    from .prune.calibration import load_calibration_images, resolve_method

    model = copy.deepcopy(source_model(ckpt)).float().to(ctx.device)
    c = config.calibration
    done: dict[str, Any] = {"stats_before": sparsity_stats(model, conv_layers(model, config.include,
                                                                              config.exclude)).to_dict(per_layer=False)}
    plan = _cached(cache, "overlap", lambda: overlap_plan(config, ctx.settings.data)) if ctx.settings is not None else {}
    if config.structure == "channel":
        done.update(_channel_prune(model, config, ctx, plan, cache))
    else:
        calibration = None
        first = cache is None or "method" not in cache  # said once per search
        method, why = _cached(cache, "method", lambda: resolve_method(
            config.method, ctx.settings.data if ctx.settings else None, c.images, c.allow_overlap))
        if why and first:
            LOGGER.info("yolo_prune_plugin: method %s", why)
        if method in DATA_AWARE_METHODS:
            data = _calibration_data(ctx, f"method {method!r}")
            calibration = _cached(cache, "images", lambda: load_calibration_images(
                data, ctx.imgsz, n=c.images, batch_size=c.batch_size, seed=c.seed, device=ctx.device,
                allow_overlap=c.allow_overlap))
        result = prune_model(model, config.amount, method, config.include, config.exclude,
                             calibration=calibration, options=config.obs)
        details = {**result.extra, "auto": why} if why else result.extra
        done.update(seconds=round(result.seconds, 3), details=details, method=method)
    if plan:
        done["details"] = {**done["details"], "overlap": plan}
    n = config.bn_recalibration.count(config.structure)
    if n and "reconstruction" in done:
        LOGGER.info("BatchNorm statistics kept: the reconstruction matched the dense pre-BatchNorm outputs")
    elif n:
        from .prune.bn_recalibration import recalibrate_bn

        data = _calibration_data(ctx, "bn_recalibration")
        images = _cached(cache, "bn", lambda: load_calibration_images(
            data, ctx.imgsz, n=n, batch_size=config.bn_recalibration.batch_size, seed=c.seed, device=ctx.device,
            allow_overlap=c.allow_overlap or "bn_recalibration" in plan))
        done["recalibration"] = recalibrate_bn(model, images, config.bn_recalibration.batch_size)
        LOGGER.info("BatchNorm statistics re-estimated on %d train images (%d layers)", len(images),
                    done["recalibration"]["layers"])
    return model.eval(), done


def _channel_prune(model: nn.Module, config: PruneConfig, ctx: RunContext, plan: Mapping[str, str],
                   cache: Optional[dict] = None) -> dict:
    """``structure: channel``: channel pruning (in place), then reconstruction / mean compensation against the dense
    model on the calibration images when configured. ``plan``: the overlap decisions (:func:`overlap_plan`): a
    default that would fit the evaluation images falls back. ``cache``: see :func:`prune_stage`. Returns what was
    done."""
    from .prune.calibration import load_calibration_batch
    from .prune.channel import FALLBACK_IMPORTANCE, channel_prune

    t = config.target
    ch = config.channel.resolved(ctx.settings is not None and "channel.reconstruct" not in plan,
                                 speed_budget=t.min_speedup is not None and t.runtime == "onnxruntime")
    c = config.calibration
    imp = FALLBACK_IMPORTANCE if "channel.importance" in plan else ch.importance
    calibration = None
    needs = channel_data_needs(config, ch)
    if needs or (imp is None and ctx.settings is not None):
        data = _calibration_data(ctx, needs[0] if needs else "channel importance 'taylor'")
        calibration = _cached(cache, "batch", lambda: load_calibration_batch(
            data, ctx.imgsz, n=c.images, seed=c.seed, allow_overlap=c.allow_overlap))
    dense = copy.deepcopy(model) if ch.reconstruct or ch.compensate else None
    residual = _plan_residual(model, config, ctx.channel_plan) if ctx.channel_plan is not None else None
    res = channel_prune(model, config.amount, importance=imp, round_to=ch.round_to, include=config.include,
                        exclude=config.exclude, calibration=calibration, max_layer_ratio=ch.max_layer_ratio,
                        imgsz=ctx.imgsz, cost_aware=ch.cost_aware, round_share=ch.round_share,
                        allocation=ch.allocation, cache=None if cache is None else _cached(cache, "channel", dict),
                        plan=ctx.channel_plan,
                        latency_cache=ctx.cache_dir / f"latency_{ctx.imgsz}.json" if ctx.cache_dir else None)
    done: dict[str, Any] = {"seconds": round(res.seconds, 3), "details": {}, "channels": res.to_dict(per_layer=True),
                            "plan": res.plan}
    if ctx.channel_plan is not None:
        done["channels"]["plan"] = "the channels the penalty trained toward zero (channel.regularize / recipe)"
        done["channels"]["residual"] = residual
        LOGGER.info("Removed exactly the planned channels (no re-ranking): %d in %d groups, %d BatchNorm channels with "
                    "the groups' members; their |scale|+|shift| before removal %.4g, %d still above 1e-3",
                    sum(len(v) for v in res.plan.values()), len(res.plan), residual["channels"], residual["l1"],
                    residual["alive"])
        if residual["alive"] and not config.finetune.epochs:
            LOGGER.warning("yolo_prune_plugin: %d of %d planned channels were not trained away (|scale|+|shift| > "
                           "1e-3): removing them costs accuracy; fine-tune after the removal with "
                           "--prune-finetune-epochs N (finetune.epochs)", residual["alive"], residual["channels"])
    if dense is not None:
        from .prune.reconstruction import reconstruct_layers

        images = calibration[0].to(ctx.device)
        rec = reconstruct_layers(model, dense, images, kept=res.kept, refit=ch.reconstruct, compensate=ch.compensate)
        done["reconstruction"] = rec
        done["channels"]["reconstruction"] = {k: v for k, v in rec.items() if k not in ("errors", "errors_before")}
        done["seconds"] = round(res.seconds + rec["seconds"], 3)
        LOGGER.info("Reconstructed %d layers against the dense model on %d train images (%s s)", rec["layers"],
                    rec["images"], rec["seconds"])
    return done


def _plan_residual(model: nn.Module, config: PruneConfig, plan: dict) -> dict:
    """``|scale| + |shift|`` of the BatchNorm channels ``plan`` removes (every member of each group), before the
    removal (:func:`~yolo_prune_plugin.training.recovery.bn_residual`)."""
    from .training.channel_regularize import regularize_targets
    from .training.recovery import bn_residual

    targets, _ = regularize_targets(model, config, plan)
    return bn_residual(model, targets)


def _cached(cache: Optional[dict], key: str, load: Any) -> Any:
    """``load()``, kept in ``cache`` under ``key`` when a cache is given."""
    if cache is None:
        return load()
    if key not in cache:
        cache[key] = load()
    return cache[key]


def _calibration_data(ctx: RunContext, what: str) -> dict:
    if ctx.settings is None:
        raise PruneError(f"{what} needs train-split images: pass --data (or set bn_recalibration.images: 0)")
    return ctx.settings.data


def finetune_stage(out: Path, model: nn.Module, entry: ReportEntry, config: PruneConfig,
                   ctx: RunContext, dense: Optional[nn.Module] = None,
                   epochs: Optional[int] = None) -> tuple[dict, nn.Module]:
    """Fine-tune the one-shot file ``out`` in YOLOv5's own loop with its zeros held (``finetune.distill``: from
    ``dense``, the unpruned model); the fine-tuned checkpoint and its model. YOLOv5's own final validation of the
    fine-tune run is not reused: it runs with YOLOv5's NMS time limit, and every "after" number the plugin reports
    comes from its own validation without that limit. ``epochs``: the fine-tune's share of ``finetune.epochs``
    (a recipe's last phase; None: all of them)."""
    from .training.finetune import finetune_checkpoint
    from .training.masks import count_leaks, count_masked, zero_masks

    ft_cfg = config.finetune
    project, name, hyp_path = finetune_location(Path(entry.checkpoint))
    channel = config.structure == "channel"  # a smaller dense architecture: trained as it is, no mask to hold
    masks = {} if channel else zero_masks(model, config.include, config.exclude)
    epochs = ft_cfg.epochs if epochs is None else epochs
    ft = finetune_checkpoint(out, ctx.opt, epochs, lr_scale=ft_cfg.lr_scale,
                             imgsz=ft_cfg.imgsz or entry.deploy_imgsz,  # recovery at the size it deploys at
                             include=config.include, exclude=config.exclude, masks=masks or None,
                             warmup=ft_cfg.warmup, project=project, name=name, hyp_path=hyp_path, backend=ctx.backend, keep_architecture=channel,
                             teacher=dense if ft_cfg.distill else None, distill_weight=ft_cfg.distill_weight,
                             distill_features=ft_cfg.distill_features,
                             keep="last" if ft_cfg.keep == "auto" else ft_cfg.keep, lr_schedule=ft_cfg.lr_schedule)
    if ft_cfg.keep == "auto":
        ft.best, ft.kept = choose_kept(ft.best, ft.kept, ctx)
    ckpt = load_checkpoint(ft.best, ctx.backend)
    tuned = source_model(ckpt).float()
    if channel and _channels(tuned) != _channels(model):
        raise PruneError(f"{ft.best}: the fine-tuned model lost the pruned architecture (channel counts differ); "
                         f"{out} still holds the one-shot pruned model")
    leaks = dict(ft.leaks)
    leaks["best_pruned.pt"] = count_leaks(tuned, masks)
    entry.finetune = {"epochs": epochs, "lr_scale": ft_cfg.lr_scale, "imgsz": ft.imgsz,
                      "warmup": ft.warmup, "loop": ft.loop, "distill": ft.distill, "lr0": ft.hyp["lr0"],
                      "lr_schedule": ft_cfg.lr_schedule, "run": str(ft.save_dir), "source": str(ft.best), "kept": ft.kept,
                      "masked_weights": count_masked(masks), "seconds": round(ft.seconds, 1),
                      "history": ft.history}
    entry.leaks = leaks
    if sum(leaks.values()):
        raise PruneError(f"{ft.best}: pruned weights became non-zero during fine-tuning ({leaks}); "
                         f"{out} still holds the one-shot pruned model")
    return ckpt, tuned


def choose_kept(last: Path, kept: dict, ctx: RunContext) -> tuple[Path, dict]:
    """``finetune.keep: auto``: ``best.pt`` or ``last.pt`` (``last``) of a fine-tune run, whichever has the
    higher YOLOv5 fitness (0.1 mAP50 + 0.9 mAP50-95) in the plugin's own validation (no NMS time limit) on the val
    split of the fine-tune's data YAML, when that split has at least ``AUTO_KEEP_MIN_IMAGES`` images; otherwise
    ``last.pt`` (YOLOv5's pick on a few dozen images followed one class, not the test split: docs/recovery.md).
    Returns the file and the report's ``kept`` record."""
    from .backend.evaluation import evaluate_weights, make_dataloader, make_settings
    from .options import AUTO_KEEP_MIN_IMAGES

    best = last.with_name("best.pt")
    rec = {**kept, "rule": "auto", "file": last.name, "epoch": kept.get("last_epoch")}
    if not best.is_file() or kept.get("best_epoch") in (None, kept.get("last_epoch")) or ctx.settings is None:
        rec["why"] = "best.pt is the last epoch" if best.is_file() else "no best.pt"
        return last, rec
    s = ctx.settings
    data = ctx.opt.get("data") or s.data  # the fine-tune's own data YAML: its val split, never the report's
    settings = make_settings(data, s.imgsz, s.batch_size, s.device, s.single_cls, s.workers, ctx.backend)
    loader = make_dataloader(settings, backend=ctx.backend)
    n = len(loader.dataset)
    rec["val_images"] = n
    if n < AUTO_KEEP_MIN_IMAGES:
        rec["why"] = f"the val split has {n} images (< {AUTO_KEEP_MIN_IMAGES}): too few to pick between epochs"
        LOGGER.info("finetune.keep auto: kept last.pt (%s)", rec["why"])
        return last, rec
    fit = {}
    for f in (best, last):
        m = evaluate_weights(f, settings, loader, backend=ctx.backend)
        fit[f.name] = round(0.1 * m.map50 + 0.9 * m.map, 6)
    choice = best if fit["best.pt"] > fit["last.pt"] else last
    rec.update(file=choice.name, epoch=kept["best_epoch"] if choice == best else kept.get("last_epoch"),
               fitness={"best.pt": fit["best.pt"], "last.pt": fit["last.pt"]},
               why=f"higher fitness on the {n} val images")
    LOGGER.info("finetune.keep auto: kept %s (fitness on %d val images: best.pt %.4f, last.pt %.4f)", choice.name, n,
                fit["best.pt"], fit["last.pt"])
    return choice, rec


def regularize_stage(source: Path, dense: nn.Module, plan: dict, epochs: int, entry: ReportEntry,
                     config: PruneConfig, ctx: RunContext) -> tuple[dict, nn.Module, dict]:
    """Train ``source`` (the dense checkpoint) for ``epochs`` with the penalty on ``plan``'s channels, then remove
    exactly the plan from the last epoch's model (the pipeline's channel prune with a fixed plan: reconstruction and
    BatchNorm statistics as configured). Returns the trained checkpoint, the pruned model and the phase's record
    for the report."""
    from dataclasses import replace as _replace

    from .prune.channel import channel_prune
    from .training.channel_regularize import ChannelRegularizer, val_map
    from .training.finetune import finetune_checkpoint
    from .training.recovery import bn_residual, output_change

    config = _replace(config, amount=entry.amount)  # a budget search's amount; a plan is checked against it
    ft = config.finetune
    reg = ChannelRegularizer(config, ctx.backend, plan=plan, weight=ft.regularize_weight)
    hooks = [("on_train_start", reg.train_start), ("on_train_epoch_start", reg.epoch_start),
             ("on_train_batch_end", lambda *a, **k: reg.batch_end()),
             ("on_fit_epoch_end", lambda log_vals, epoch, best_fitness, fi: reg.fit_epoch_end(epoch, val_map(log_vals)))]
    project, name, _ = finetune_location(Path(entry.checkpoint))
    LOGGER.info("finetune.recipe regularize: %d of %d epochs train the dense model's %d planned channels toward "
                "zero (weight %g), then exactly that plan is removed", epochs, ft.epochs,
                sum(len(v) for v in plan.values()), reg.reg.weight)
    try:
        run = finetune_checkpoint(source, ctx.opt, epochs, lr_scale=ft.lr_scale, imgsz=ft.imgsz or entry.deploy_imgsz,
                                  include=config.include, exclude=config.exclude, masks=None, warmup=ft.warmup,
                                  project=project, name=name.replace("_finetune", "_regularize"),
                                  backend=ctx.backend, keep_architecture=True, hooks=hooks, keep="last",
                                  lr_schedule=ft.lr_schedule)
    finally:
        reg.close()
    if not reg.targets:
        raise PruneError(f"finetune.recipe regularize: the penalty never started in {run.save_dir}")
    # the last epoch, not YOLOv5's best.pt: its fitness on a small val split prefers the epochs before the
    # penalty had done its work (docs/recovery.md)
    ckpt = load_checkpoint(run.last, ctx.backend)
    trained = source_model(ckpt).float().to(ctx.device)
    change = None
    if ctx.settings is not None:  # what the removal alone does to the outputs (no reconstruction or recalibration)
        from .prune.calibration import load_calibration_images

        removed = copy.deepcopy(trained)
        channel_prune(removed, config.amount, plan=plan, include=config.include, exclude=config.exclude,
                      imgsz=ctx.imgsz, log=False)
        images = load_calibration_images(ctx.settings.data, ctx.imgsz, n=8, batch_size=8, seed=0, device=ctx.device,
                                         allow_overlap=True)
        change = round(output_change(trained, removed, images), 6)
    model, done = prune_stage(ckpt, config, _replace(ctx, channel_plan=plan))
    # "after": what the removal measured on the same trained model (the plan's BatchNorm channels, every group member)
    residual = {"before": bn_residual(dense, reg.targets), "after": done["channels"]["residual"]}
    penalty = {p["epoch"]: p for p in reg.history}
    record = {"epochs": epochs, "weight": reg.reg.weight, "fade_batches": reg.batches, "run": str(run.save_dir),
              "source": str(run.last),
              "seconds": round(run.seconds, 1), "imgsz": run.imgsz, "lr0": run.hyp["lr0"],
              "history": [{**h, **penalty.get(h["epoch"], {})} for h in run.history],
              "residual": residual, "removal_output_change": change,
              "removal": {k: done[k] for k in ("seconds", "recalibration") if k in done}}
    LOGGER.info("finetune.recipe regularize: planned channels' BatchNorm |scale|+|shift| %.4g -> %.4g (%d of %d "
                "still above 1e-3); removing them changed the outputs by %s", residual["before"]["l1"],
                residual["after"]["l1"], residual["after"]["alive"], residual["after"]["channels"],
                "n/a" if change is None else f"{100 * change:.2f} %")
    return ckpt, model, record


def finetune_location(checkpoint: Path) -> tuple[Path, str, Optional[Path]]:
    """Where the fine-tune of ``checkpoint`` runs: (project, name, hyp file). A YOLOv5 run's
    ``<run>/weights/best.pt``: ``<run>_finetune`` beside the run, hyp in ``<run>/hyp_finetune.yaml``; any other file
    (``yolo-prune prune``): ``<stem>_finetune`` beside it (YOLOv5 increments the name, nothing is overwritten)."""
    if checkpoint.parent.name == "weights":
        run_dir = checkpoint.parent.parent
        return run_dir.parent, f"{run_dir.name}_finetune", run_dir / "hyp_finetune.yaml"
    return checkpoint.parent, f"{checkpoint.stem}_finetune", None


def _channels(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.out_channels, m.in_channels) for _, m in conv_layers(model)]
