"""The one pipeline behind every entry point (train-end hook, fine-tune, schedule, ``yolo-prune prune``, API).

load once -> prune -> (fine-tune) -> save ``<stem><suffix>.pt`` atomically -> evaluate with YOLOv5's
validator -> export -> one :class:`~yolo_prune_plugin.report.ReportEntry`.

The callers differ only in where the checkpoint and the settings come from; :func:`run` does the work, and
:func:`write_report` writes ``prune_report.json`` and prints the table.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.nn as nn

from ._version import __version__
from .backend.evaluation import Metrics, backend_select_device, evaluate, evaluate_weights, make_settings
from .backend.loading import Backend, first_line, load_checkpoint
from .config import PruneConfig, config_equal, data_free_method
from .errors import OutputExistsError, PruneError
from .prune.unstructured import conv_layers, sparsity_stats
from .report import ReportEntry, print_report
from .stages import RunContext, finetune_stage, prune_stage, source_model
from .tools.budget_run import recheck_budget
from .tools.heldout import calibration_needs
from .tools.loggers import log_results
from .training.dense_reference import ReferenceModel
from .utils.files import atomic_path, write_json

LOGGER = logging.getLogger("yolo_prune_plugin")
REPORT_NAME = "prune_report.json"
BENCH_RUNS = 30  # timed rounds of `bench: true` (each model once per round, round-robin)

__all__ = ["RunContext", "context_from_opt", "output_path", "check_output_free", "run", "write_report",
           "check_exports", "REPORT_NAME"]


def needs_data(config: PruneConfig) -> bool:
    return bool(config.evaluate or calibration_needs(config) or config.sweep.amounts)


def val_batch_size(opt: Mapping[str, Any]) -> int:
    """train.py's batch size for its final validation: twice the per-process training batch."""
    return max(int(opt.get("batch_size", 16)) // int(os.getenv("WORLD_SIZE", 1)) * 2, 1)


def context_from_opt(opt: Mapping[str, Any], config: PruneConfig, backend: Backend) -> RunContext:
    """The context of a training run from its options (train.py's device and final-validation batch size)."""
    local_rank = int(os.getenv("LOCAL_RANK", -1))
    device = (torch.device("cuda", local_rank) if local_rank != -1 else
              backend_select_device(backend, opt.get("device", ""), 0))
    imgsz = int(opt.get("imgsz", 640))
    settings = None
    if needs_data(config):
        settings = make_settings(opt["data"], imgsz, val_batch_size(opt), device, bool(opt.get("single_cls", False)),
                                 int(opt.get("workers", 8)), backend)
    return RunContext(backend, device, imgsz, settings, dict(opt))


# --------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------
def output_path(weights: Path, config: PruneConfig) -> Path:
    """``runs/train/exp/weights/best.pt`` -> ``.../best_pruned.pt``."""
    return weights.with_name(f"{weights.stem}{config.suffix}.pt")


def check_output_free(out: Path, config: PruneConfig, backend: Optional[Backend] = None) -> None:
    """Refuse to replace a file the plugin did not write, or one written with a different configuration."""
    if config.overwrite or not out.exists():
        return
    try:
        old = load_checkpoint(out, backend)
    except PruneError:
        old = None
    old_cfg = (old or {}).get("prune", {}).get("config") if isinstance(old, dict) else None
    if old_cfg is None:
        raise OutputExistsError(f"{out}: exists and was not written by yolo_prune_plugin; move it away or pass "
                                "--prune-overwrite (config: overwrite: true)")
    if not config_equal(old_cfg, config.to_dict()):
        raise OutputExistsError(f"{out}: exists from a different pruning configuration "
                                f"(method={old_cfg.get('method')}, amount={old_cfg.get('amount')}); pass "
                                "--prune-overwrite (config: overwrite: true) to replace it")


def _stripped(ckpt: Mapping[str, Any], model: nn.Module, dtype: torch.dtype) -> dict:
    """A checkpoint as YOLOv5's ``strip_optimizer`` leaves it, holding ``model`` (cpu, ``dtype``, frozen)."""
    model = model.to("cpu").to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    new = {k: v for k, v in ckpt.items() if k not in ("model", "ema", "optimizer", "updates", "prune")}
    new.update(model=model, ema=None, optimizer=None, updates=None)
    return new


def _evaluate_before(ckpt: Mapping[str, Any], ctx: RunContext) -> Metrics:
    """The unpruned model, validated as ``attempt_load`` would give it (fused, eval) without reloading it."""
    model = copy.deepcopy(source_model(ckpt)).float().eval()
    model = model.fuse() if hasattr(model, "fuse") else model
    if ctx.settings.half:
        model = model.half()
    return evaluate(model, ctx.settings, backend=ctx.backend)


# --------------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------------
def run(source: str | Path, config: PruneConfig, ctx: RunContext, *, ckpt: Optional[Mapping[str, Any]] = None,
        before: Optional[Metrics] = None, before_source: Optional[str] = None, pruned: Optional[nn.Module] = None,
        out: Optional[Path] = None, mode: Optional[str] = None, schedule: Optional[dict] = None,
        leaks: Optional[dict] = None, channels: Optional[dict] = None,
        reference: Optional[ReferenceModel] = None) -> ReportEntry:
    """Prune ``source`` (or take the already ``pruned`` model of a schedule run), fine-tune when the config asks,
    write ``out`` (default ``<stem><suffix>.pt`` beside ``source``) atomically, evaluate it as YOLOv5 loads it,
    export it; returns the report entry (also stored under the written file's ``prune`` key).

    ``ckpt``: ``source`` already loaded (it is never loaded twice); ``before``: metrics YOLOv5 already computed
    for ``source`` (reused, not recomputed). ``channels``: the channel section of a channel schedule's ``pruned``
    model (channel counts, params, GFLOPs against the dense model). ``reference``: a schedule run's dense model
    (its ``source`` is already pruned): validated for the "before" metrics when ``before`` is None and it holds
    weights, and the ``bench`` baseline; without it a schedule run never validates ``source`` as "before"
    (``before_source`` then says why they are absent) and benches against the dense YAML architecture.

    An unexpected exception becomes one :class:`PruneError` line naming ``source`` (traceback at DEBUG, i.e.
    ``--verbose``); the atomic writes leave no partial output and no temporary file behind.
    """
    with _failure_named(Path(source).expanduser()):
        return _run(source, config, ctx, ckpt=ckpt, before=before, before_source=before_source, pruned=pruned,
                    out=out, mode=mode, schedule=schedule, leaks=leaks, channels=channels, reference=reference)


@contextlib.contextmanager
def _failure_named(source: Path) -> Iterator[None]:
    try:
        yield
    except PruneError:
        raise
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback for --verbose
        LOGGER.debug("traceback", exc_info=True)
        raise PruneError(f"{source}: pruning failed ({first_line(e)}); run with --verbose for the traceback") from e


def _run(source: str | Path, config: PruneConfig, ctx: RunContext, *, ckpt: Optional[Mapping[str, Any]] = None,
         before: Optional[Metrics] = None, before_source: Optional[str] = None, pruned: Optional[nn.Module] = None,
         out: Optional[Path] = None, mode: Optional[str] = None, schedule: Optional[dict] = None,
         leaks: Optional[dict] = None, channels: Optional[dict] = None,
         reference: Optional[ReferenceModel] = None) -> ReportEntry:
    """:func:`run` without the failure wrapper."""
    source = Path(source).expanduser().resolve()
    out = out or output_path(source, config)
    check_output_free(out, config, ctx.backend)
    ctx = replace(ctx, cache_dir=ctx.cache_dir or out.parent)  # measured tables are kept beside the output
    ckpt = ckpt if ckpt is not None else load_checkpoint(source, ctx.backend)
    dtype = next(source_model(ckpt).parameters()).dtype  # YOLOv5 writes fp16: keep what the source holds
    mode = mode or ("finetune" if config.finetune.epochs else "oneshot")

    done: dict[str, Any] = {}
    search = None
    base_ctx = ctx  # "before" is the dense model at the evaluation size
    if pruned is None and config.target.active:
        search = _budget_search(source, ckpt, config, ctx)
        model, done = search.model, search.done
        if done is None:  # resizing alone won: the dense model, to deploy at a smaller input size
            model = copy.deepcopy(model).float().to(ctx.device).eval()
            done = {"stats_before": sparsity_stats(model, conv_layers(model, config.include, config.exclude)
                                                   ).to_dict(per_layer=False), "seconds": 0.0,
                    "details": {"resized_only": "no channel removed: the dense model at deploy_imgsz met the budget"}}
        if before is None and search.full_val:  # the dense model was just validated on the whole val split
            before, before_source = search.dense, "validated by the plugin (budget search)"
        deploy = search.section.get("deploy_imgsz")
        if deploy and deploy != ctx.imgsz:  # written file evaluated, fine-tuned, exported and timed at its size
            ctx = replace(ctx, imgsz=deploy, settings=replace(ctx.settings, imgsz=deploy))
    if pruned is None:
        model, done = (model, done) if search else prune_stage(ckpt, config, ctx)
        stats_before, seconds, details = done["stats_before"], done["seconds"], done["details"]
    else:
        model, seconds, details = pruned.float().to(ctx.device), None, {}
        stats_before = (schedule or {}).get("dense_stats")
    amount = (config.schedule.final_amount if mode == "schedule" else
              search.section["amount"] if search else config.amount)
    method = done.get("method") or data_free_method(config)  # schedule / channel: nothing calibrated
    entry = ReportEntry(checkpoint=str(source), output=str(out), mode=mode, method=method, amount=amount,
                        device=str(ctx.device), imgsz=ctx.imgsz, prune_seconds=seconds,
                        sparsity_before=stats_before, method_details=details, schedule=schedule, leaks=leaks,
                        structure=config.structure, channels=done.get("channels", channels),
                        recalibration=done.get("recalibration"),
                        metrics_before=before.to_dict() if before else None,
                        metrics_before_source=before_source if before else None,
                        target=search.section if search else None,
                        deploy_imgsz=search.section.get("deploy_imgsz") if search else None)
    entry.imgsz = base_ctx.imgsz
    if config.evaluate and ctx.settings is not None and before is None:
        if mode != "schedule":  # source is the unpruned model
            LOGGER.info("Validating %s (before pruning)...", source.name)
            entry.metrics_before = _evaluate_before(ckpt, base_ctx).to_dict()
            entry.metrics_before_source = "validated by the plugin"
        elif reference is not None and reference.weights:  # a schedule's source is pruned: its dense reference
            LOGGER.info("Validating the %s...", reference.note)
            entry.metrics_before = _evaluate_before({"model": reference.model}, ctx).to_dict()
            entry.metrics_before_source = before_source or f"{reference.note}, validated by the plugin"
        else:
            entry.metrics_before_source = before_source or "absent: no dense reference of the schedule run"
            LOGGER.warning("yolo_prune_plugin: no 'before' metrics: %s", entry.metrics_before_source)

    saved = False  # the final model already written and evaluated (a recipe whose last phase wrote it)
    if config.finetune.epochs:
        _save(out, ckpt, model, dtype, entry, config, ctx)
        entry.metrics_oneshot, entry.metrics_after = entry.metrics_after, None
        ckpt, model, saved = _recover(source, ckpt, model, done, out, dtype, entry, config, ctx)

    if not saved:
        _save(out, ckpt, model, dtype, entry, config, ctx)
    if config.finetune.epochs:
        _warn_if_finetune_lost(entry)
    if config.export:
        from .backend.export import export_and_verify

        o = config.export_options
        arts = export_and_verify(out, config.export, imgsz=ctx.imgsz, device=ctx.export_device, half=o.half,
                                 dynamic=o.dynamic, simplify=o.simplify, opset=o.opset, atol=o.atol, overwrite=True)
        entry.exports = [a.to_dict() for a in arts]
    if config.bench:
        from .tools.bench import bench_files

        if mode == "schedule" and reference is None:  # source is pruned: bench the dense architecture
            from .training.dense_reference import rebuild_dense

            reference = rebuild_dense(source_model(ckpt), ctx.backend)
        with _reference_file(reference, ckpt, dtype) as ref:
            base = ref or source
            LOGGER.info("Timing %s (%d px) against %s (%d px) (PyTorch eager and ONNX Runtime, batch 1)...",
                        out.name, ctx.imgsz, reference.note if ref else base.name, base_ctx.imgsz)
            if config.structure == "channel" and not ref and config.evaluate and base_ctx.settings is not None:
                _bench_against_resizing(entry, source, out, base_ctx, ctx.imgsz, source_model(ckpt))
            else:
                entry.bench = bench_files([base, out], imgsz=base_ctx.imgsz, batch=1, runs=BENCH_RUNS, warmup=5,
                                          sizes=[base_ctx.imgsz, ctx.imgsz])
        if ref:
            entry.bench[0].update(file=None, reference=reference.note)  # the temporary file is gone
        elif mode == "schedule":
            entry.bench[0]["reference"] = f"{source.name}, already pruned (no dense reference available)"
    if entry.deploy_imgsz and entry.deploy_imgsz != base_ctx.imgsz:
        LOGGER.info("Deploy %s at --img %d (the budget search chose it), e.g. python export.py --weights %s "
                    "--img %d --include onnx", out.name, entry.deploy_imgsz, out, entry.deploy_imgsz)
    return entry


def _recover(source: Path, ckpt: Mapping[str, Any], model: nn.Module, done: Mapping[str, Any], out: Path,
             dtype: torch.dtype, entry: ReportEntry, config: PruneConfig,
             ctx: RunContext) -> tuple[Any, nn.Module, bool]:
    """``finetune``: the recipe's phases on the one-shot file ``out`` (plain: fine-tune it; regularize: train the
    dense ``ckpt`` with the plan's channels penalised, remove exactly that plan, write it to ``out``, fine-tune the
    rest of the epochs). Returns the final checkpoint and model, and whether ``out`` already holds them (written and
    evaluated: a penalty phase with no fine-tune after it)."""
    from .stages import regularize_stage
    from .training.recovery import phase_epochs, recipe_section

    dense = source_model(ckpt)
    k, rest = phase_epochs(config)
    plan = done.get("plan") if isinstance(done, Mapping) else None
    if not k or not plan:
        if k and not plan:
            LOGGER.info("finetune.recipe regularize: nothing was removed (no plan to train away); plain fine-tune")
        return (*finetune_stage(out, model.float(), entry, config, ctx, dense=dense), False)
    ckpt, model, penalty = regularize_stage(source, dense, plan, k, entry, config, ctx)
    entry.finetune = recipe_section(config, penalty, None)  # holds `penalty` itself: updated below in place
    _save(out, ckpt, model, dtype, entry, config, ctx)  # the plan removed: evaluated, the next phase's source
    penalty["metrics_removed"] = entry.metrics_after
    if rest:
        entry.metrics_after = None
        ckpt, model = finetune_stage(out, model.float(), entry, config, ctx, dense=dense, epochs=rest)
        entry.finetune = recipe_section(config, penalty, entry.finetune)
    return ckpt, model, not rest


def _warn_if_finetune_lost(entry: ReportEntry) -> None:
    """A warning when the fine-tuned file scores below the one-shot file on the val split (measured: a coco128
    split with 64 training images and 80 classes, where every fine-tune lowered held-out mAP50-95)."""
    one, after = (entry.metrics_oneshot or {}).get("mAP50-95"), (entry.metrics_after or {}).get("mAP50-95")
    if one is not None and after is not None and after < one:
        LOGGER.warning("yolo_prune_plugin: fine-tuning lowered mAP50-95 on the val split (%.4f one-shot -> %.4f): "
                       "too few training images for the model's classes, or a too high finetune.lr_scale; the "
                       "one-shot file is what 'yolo-prune prune' writes without --finetune-epochs", one, after)


def _bench_against_resizing(entry: ReportEntry, source: Path, out: Path, ctx: RunContext, deploy: int,
                            model: nn.Module) -> None:
    """``bench`` of a channel prune: also the dense model at lower ``--img`` sizes in the same timing run, and the
    one as fast as the pruned file evaluated on the same val images (``entry.resize_baseline``). ``model``: one
    already loaded with the source's strides (the checkpoint is not read again for them)."""
    from .backend.evaluation import evaluate_weights
    from .tools.bench import bench_against_resizing, describe_resize_baseline
    from .tools.budget import auto_sizes
    from .tools.budget_run import model_stride

    sizes = auto_sizes(ctx.imgsz, model_stride(model))

    def evaluate_at(s: int) -> dict:
        LOGGER.info("Validating %s at --img %d (the resize baseline)...", source.name, s)
        return evaluate_weights(source, replace(ctx.settings, imgsz=s), backend=ctx.backend).to_dict()

    entry.bench, entry.resize_baseline = bench_against_resizing(source, out, ctx.imgsz, deploy, sizes, evaluate_at,
                                                                BENCH_RUNS, 5)
    if entry.resize_baseline:
        text, worse = describe_resize_baseline(entry.resize_baseline, entry.metrics_after)
        if worse:
            LOGGER.warning("yolo_prune_plugin: resizing alone is as fast and as accurate: %s; try --img %d, or "
                           "target.imgsz: auto with a speed-up budget", text, entry.resize_baseline["imgsz"])
        else:
            LOGGER.info("Against resizing: %s", text)


def _budget_search(source: Path, ckpt: Mapping[str, Any], config: PruneConfig, ctx: RunContext) -> Any:
    """``target``: the amount searched over one-shot prunes of ``ckpt`` (calibration loaded once)."""
    from .tools.budget_run import budget_search

    if ctx.settings is None:
        raise PruneError("target: the budget search evaluates every candidate: pass --data")
    cache: dict[str, Any] = {}
    return budget_search(source, source_model(ckpt), lambda a: prune_stage(ckpt, replace(config, amount=a), ctx, cache),
                         config, ctx.settings, ctx.backend, ctx.imgsz)


@contextlib.contextmanager
def _reference_file(reference: Optional[ReferenceModel], ckpt: Mapping[str, Any],
                    dtype: torch.dtype) -> Iterator[Optional[Path]]:
    """``reference`` saved as a checkpoint (like ``ckpt``, holding its model) in a temporary folder that is deleted
    afterwards (nothing is written beside the weights); None when there is no reference."""
    if reference is None:
        yield None
        return
    tmp = Path(tempfile.mkdtemp(prefix="yolo-prune-dense-"))
    try:
        path = tmp / "dense_reference.pt"
        torch.save(_stripped(ckpt, copy.deepcopy(reference.model), dtype), path)
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save(out: Path, ckpt: Mapping[str, Any], model: nn.Module, dtype: torch.dtype, entry: ReportEntry,
          config: PruneConfig, ctx: RunContext) -> None:
    """Write ``out`` atomically; evaluate the written file (loaded exactly as YOLOv5 loads it) before it is
    renamed into place, so a failure or an interrupt leaves no half-finished output."""
    new = _stripped(ckpt, model, dtype)
    saved = new["model"]
    entry.sparsity_after = sparsity_stats(saved, conv_layers(saved, config.include, config.exclude)).to_dict()
    entry.sparsity_all_conv = sparsity_stats(saved).to_dict(per_layer=False)
    stamp = {"version": __version__, "config": config.to_dict(), "date": _dt.datetime.now().isoformat(timespec="seconds")}
    with atomic_path(out) as tmp:
        new["prune"] = {**stamp, **entry.to_dict()}
        torch.save(new, tmp)
        if config.evaluate and ctx.settings is not None:
            LOGGER.info("Validating %s (after %s)...", out.name,
                        "fine-tuning" if entry.finetune else "pruning")
            entry.metrics_after = evaluate_weights(tmp, ctx.settings, backend=ctx.backend).to_dict()
            s = ctx.settings
            entry.eval = {"imgsz": s.imgsz, "batch_size": s.batch_size, "iou_thres": s.iou_thres, "half": s.half}
            recheck_budget(entry)
            new["prune"] = {**stamp, **entry.to_dict()}
            torch.save(new, tmp)
    LOGGER.info("Saved %s", out)


def check_exports(entries: list[ReportEntry]) -> None:
    """Raise :class:`PruneError` if any exported artefact failed verification (after the report is written)."""
    failed = [a for e in entries for a in e.exports if not a.get("ok")]
    if failed:
        raise PruneError("export verification failed for " +
                         ", ".join(f"{a['format']} ({a.get('message')})" for a in failed))


def write_report(entries: list[ReportEntry], config: PruneConfig, report_dir: str | Path,
                 history: Optional[list] = None, sweep: Optional[dict] = None, echo: Any = None,
                 yolo_loggers: Any = None) -> Path:
    """Write ``prune_report.json`` in ``report_dir``, print the before/after table(s), and log the results where
    YOLOv5 users look (TensorBoard events, ``prune_results.csv``, YOLOv5's active trackers)."""
    path = Path(report_dir) / REPORT_NAME
    images = {}
    for e in entries:
        if e.target:
            from .tools.budget_files import write_budget_files

            stem = Path(e.checkpoint).stem
            e.target["outputs"] = write_budget_files(e.target, Path(report_dir), stem)
            images[f"budget/{stem}"] = e.target["outputs"]["png"]
            LOGGER.info("Budget search plot: %s", e.target["outputs"]["png"])
    data: dict[str, Any] = {"plugin": "yolo_prune_plugin", "version": __version__,
                            "created": _dt.datetime.now().isoformat(timespec="seconds"), "config": config.to_dict(),
                            "mode": entries[0].mode if entries else None,
                            "results": [e.to_dict() for e in entries]}
    if history is not None:
        data["history"] = history
    if sweep is not None:
        data["sweep"] = sweep
    write_json(data, path)
    log_results(report_dir, data["results"], history, sweep, yolo_loggers, images=images)
    print_report(data["results"], echo=echo)
    LOGGER.info("Report written to %s", path)
    return path
