"""The budget search on a real checkpoint (:mod:`yolo_prune_plugin.tools.budget` does the choosing).

One loaded checkpoint, one evaluation set decoded once (:class:`~yolo_prune_plugin.tools.sweep.CachedBatches`),
the dense model evaluated once, and for ``structure: channel`` each probe timed side by side with the dense
model in this process (:mod:`yolo_prune_plugin.tools.bench`; the dense model is exported once). The pruning
itself is the pipeline's (``prune_fn``), so a probe is exactly what ``amount: <a>`` would write. Outputs for the
run folder: ``budget_<stem>.csv`` (the trace) and ``budget_<stem>.png`` (accuracy vs speed-up and size).

The search is quiet: YOLOv5's log of its label scan, validations and exports (layer fusing, progress bars, result
lines, the export banner: all about temporary files) is not shown; the search's own progress and trace table are.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..backend.data import image_files
from ..backend.evaluation import EvalSettings, Metrics, evaluate, make_dataloader
from ..backend.loading import Backend
from ..backend.patches import muted_yolov5
from ..config import PruneConfig
from ..errors import BudgetError, ConfigError, PruneError
from ..prune.unstructured import count_parameters
from ..report import ReportEntry
from ..utils.progress import progress
from .bench import bench_input, make_runner, require_onnxruntime, time_side_by_side, torch_threads
from .budget import (METRIC_KEYS, Budget, JointResult, Point, SearchResult, auto_sizes, describe, format_trace,
                     frontier_text, joint_search, limits_text, pick, pick_most_accurate, search)
from .sweep import CachedBatches, _fused

LOGGER = logging.getLogger("yolo_prune_plugin")

#: timed rounds (each model once per round, round-robin) and untimed calls per probe
SEARCH_RUNS, SEARCH_WARMUP = 20, 3

BIAS_NOTE = ("the amount was chosen on validation images (selection bias): the search numbers are optimistic; "
             "'final' is the chosen file on the full val set, and only held-out images give an unbiased number")


def check_target(config: PruneConfig, model: Optional[nn.Module] = None) -> None:
    """Checks of ``target`` that need the environment or the model (raised before the first epoch by
    ``api.preflight``, before any work by ``api.prune``)."""
    t = config.target
    if isinstance(t.imgsz, tuple) and model is not None:
        stride = model_stride(model)
        for s in t.imgsz:
            if s % stride:
                raise ConfigError(f"target.imgsz: {s} is not a multiple of the model's stride {stride} "
                                  f"(nearest: {max(stride, round(s / stride) * stride)})")
    changed = [f.name for f in dataclasses.fields(t) if getattr(t, f.name) != f.default]
    if not t.active and changed:
        raise ConfigError(f"target: sets {', '.join(changed)} but no budget; set target.max_drop, "
                          "target.min_speedup or target.max_size (or remove 'target')")
    if t.active and ((t.min_speedup is not None and t.runtime == "onnxruntime") or
                     (t.max_size is not None and t.size_of == "onnx")):
        require_onnxruntime("target.min_speedup on runtime onnxruntime (or target.size_of: onnx)")


@dataclass
class SearchOutcome:
    """What :func:`budget_search` found: the report section and the chosen (unfused) model."""

    section: dict  # the report entry's `target`
    model: nn.Module
    done: dict  # what prune_fn reported for the chosen amount
    dense: Metrics  # the dense model on the search images
    full_val: bool  # the search images are the whole val split


def search_settings(settings: EvalSettings, n: Optional[int], seed: int, tmp: Path) -> tuple[EvalSettings, int, int]:
    """``settings`` whose val split is a seeded subset of ``n`` images (a list file in ``tmp``); with the
    subset's and the whole split's image counts. ``n`` None or >= the split: ``settings`` unchanged."""
    root = Path(str(settings.data.get("path") or "."))
    files = image_files(settings.data["val"], root)
    if n is None or n >= len(files):
        return settings, len(files), len(files)
    chosen = sorted(random.Random(seed).sample(files, n))
    txt = tmp / "search_images.txt"
    txt.write_text("".join(f"{f}\n" for f in chosen), encoding="utf-8")
    return dataclasses.replace(settings, data={**settings.data, "val": str(txt)}), n, len(files)


class _Timer:
    """The dense model exported once; each probe timed side by side with it on the target's runtime."""

    def __init__(self, dense_file: Path, config: PruneConfig, imgsz: int, device: torch.device, backend: Backend,
                 tmp: Path):
        t = config.target
        self.backends = [t.runtime] + (["onnxruntime"] if t.size_of == "onnx" and t.runtime != "onnxruntime" else [])
        self.runtime, self.threads, self.tmp, self.backend = t.runtime, t.threads, tmp, backend
        self.device = device if t.runtime == "torch" else torch.device("cpu")
        self.x = bench_input(1, imgsz)
        with torch_threads(self.threads):
            self.dense_row, self.dense_fns = make_runner(dense_file, tmp / "dense", self.x, self.backends, self.device,
                                                         self.threads, backend)
        self.count = 0

    def measure(self, model: nn.Module, imgsz: Optional[int] = None) -> tuple[float, float, Optional[float]]:
        """(median ms, dense median / median, .onnx bytes ratio or None) of ``model`` at ``imgsz`` (default: the
        dense model's size), against the dense model at its own size."""
        self.count += 1
        d = self.tmp / f"probe{self.count}"
        d.mkdir()
        f = d / "probe.pt"
        torch.save({"model": copy.deepcopy(model).float().cpu(), "ema": None}, f)
        x = self.x if imgsz is None else bench_input(1, imgsz)
        try:
            with torch_threads(self.threads):
                row, fns = make_runner(f, d / "onnx", x, self.backends, self.device, self.threads, self.backend)
                dense_t, t = time_side_by_side([{self.runtime: self.dense_fns[self.runtime]},
                                                {self.runtime: fns[self.runtime]}], SEARCH_RUNS, SEARCH_WARMUP)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        ms, dense_ms = _median(t[self.runtime]), _median(dense_t[self.runtime])
        onnx = row["onnx_bytes"] / self.dense_row["onnx_bytes"] if row.get("onnx_bytes") else None
        return round(ms, 3), round(dense_ms / ms, 3), onnx


def model_stride(model: nn.Module) -> int:
    """The largest stride of a YOLOv5 model (every input size is a multiple of it); 32 when it has none."""
    st = getattr(model, "stride", None)
    return max(int(st.max()), 32) if isinstance(st, torch.Tensor) and st.numel() else 32


def _median(ms: list[float]) -> float:
    return float(sorted(ms)[len(ms) // 2])


class Prober:
    """One evaluation set decoded once, the dense model evaluated once (``dense``), then ``prober(amount)``: the
    pipeline's prune at that amount, evaluated, and timed side by side with the dense model (channel); the
    pruned model of the last call is ``last``. ``close()`` deletes the temporary files."""

    def __init__(self, source: Path, dense_model: nn.Module, prune_fn: Callable[[float], tuple[nn.Module, dict]],
                 config: PruneConfig, settings: EvalSettings, backend: Backend, imgsz: int):
        t = config.target
        self.prune_fn, self.config, self.backend = prune_fn, config, backend
        self.tmp = Path(tempfile.mkdtemp(prefix="yolo-prune-budget-"))
        try:
            self.settings, self.images, self.val_images = search_settings(settings, t.search_images, t.seed, self.tmp)
            self.stride = model_stride(dense_model)
            self.sized: dict[int, tuple[EvalSettings, CachedBatches]] = {}
            self.dense_model = dense_model
            self.dense = self.evaluate(copy.deepcopy(dense_model).float().to(self.settings.device))
            self.timer = (_Timer(source, config, imgsz, self.settings.device, backend, self.tmp)
                          if config.structure == "channel" else None)
        except BaseException:
            self.close()
            raise
        self.dense_params = count_parameters(dense_model)
        self.last: Optional[tuple[nn.Module, dict]] = None

    def batches(self, imgsz: Optional[int] = None) -> tuple[EvalSettings, CachedBatches]:
        """The search images decoded once per input size (default: the evaluation size)."""
        imgsz = imgsz or self.settings.imgsz
        if imgsz not in self.sized:
            settings = dataclasses.replace(self.settings, imgsz=imgsz)
            with muted_yolov5(self.backend):  # its label scan would name the temporary list of search images
                self.sized[imgsz] = settings, CachedBatches(make_dataloader(settings, self.stride, self.backend))
        return self.sized[imgsz]

    def evaluate(self, model: nn.Module, imgsz: Optional[int] = None) -> Metrics:
        """``model`` (fused copy) on the search images at ``imgsz``; YOLOv5's fusing/validation output muted
        (warnings pass)."""
        settings, batches = self.batches(imgsz)
        with muted_yolov5(self.backend):
            return evaluate(_fused(copy.deepcopy(model)), settings, batches, self.backend)

    def __call__(self, a: float) -> Point:
        return self.probe(None, a)

    def probe(self, imgsz: Optional[int], a: float) -> Point:
        """The pipeline's prune at amount ``a`` (``a == 0``: the dense model, nothing pruned), evaluated and timed
        at ``imgsz`` (None: the evaluation size)."""
        t1 = time.perf_counter()
        self.last = None
        try:
            model, done = ((copy.deepcopy(self.dense_model).float().to(self.settings.device).eval(), None) if a == 0
                           else self.prune_fn(a))
        except PruneError as e:
            return Point(a, {}, error=str(e), seconds=round(time.perf_counter() - t1, 2), imgsz=imgsz)
        m = self.evaluate(model, imgsz).to_dict()
        lat = self.timer.measure(model, imgsz) if self.timer is not None else (None, None, None)
        channel = self.config.structure == "channel"
        params = count_parameters(model)
        size = params / self.dense_params if self.config.target.size_of == "params" else lat[2]
        self.last = (model, done)
        return Point(a, {k: m[k] for k in METRIC_KEYS}, latency_ms=lat[0], speedup=lat[1], params=params,
                     size=round(size, 4) if channel and size is not None else None,
                     seconds=round(time.perf_counter() - t1, 2), imgsz=imgsz)

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def budget_search(source: Path, dense_model: nn.Module, prune_fn: Callable[[float], tuple[nn.Module, dict]],
                  config: PruneConfig, settings: EvalSettings, backend: Backend, imgsz: int) -> SearchOutcome:
    """Search ``amount`` for ``config.target``; raises :class:`BudgetError` (one line, the closest point named)
    when no evaluated amount meets it, unless ``target.write_best_effort``."""
    t = config.target
    t0 = time.perf_counter()
    prober = Prober(source, dense_model, prune_fn, config, settings, backend, imgsz)
    try:
        dense = prober.dense
        budget = full = Budget.from_target(t, dense.map)
        if t.after_finetune and budget.max_drop is not None and (t.min_speedup is not None or t.max_size is not None):
            budget = dataclasses.replace(budget, max_drop=None)  # fine-tuning wins accuracy back, never speed
            LOGGER.info("Budget: target.after_finetune %d: the search picks the most accurate one-shot point within "
                        "%s; max_drop %.4f is checked on the file after %d fine-tune epochs", t.after_finetune,
                        limits_text(budget), full.max_drop, t.after_finetune)
        elif t.after_finetune and budget.max_drop is not None:
            LOGGER.info("Budget: target.after_finetune %d with max_drop alone: the search keeps max_drop on one-shot "
                        "models (a fine-tuned accuracy is known only after fine-tuning), then fine-tunes the chosen "
                        "amount and re-checks it", t.after_finetune)
        sizes = search_sizes(t.imgsz, imgsz, prober.stride)
        sized = f", input size in {sizes}" if sizes else ""
        LOGGER.info("Budget search: %s (dense mAP50-95 %.4f on %d val images at %d px), amount in [0, %s]%s, at "
                    "most %d one-shot prunes%s", limits_text(budget), dense.map, prober.images, imgsz, t.max_amount,
                    sized, t.max_evals, f" and {len(sizes) - (imgsz in sizes)} resized dense models" if sizes else "")
        kept: dict[tuple, tuple[nn.Module, Optional[dict]]] = {}
        trace: list[Point] = []
        bar = progress(desc="budget", total=t.max_evals + (len(sizes) - (imgsz in sizes) if sizes else 0))

        def on_point(p: Point) -> None:
            trace.append(p)
            if prober.last is not None:
                kept[(p.imgsz, p.amount)] = prober.last
            keep = _best_so_far(trace, budget, bool(sizes))
            for k in [k for k in kept if keep is None or k != (keep.imgsz, keep.amount)]:
                del kept[k]  # only the best point so far keeps its model in memory
            bar.update(1)
            bar.set_postfix_str(describe(p, budget) if not p.error else f"amount {p.amount}: not pruned")

        try:
            if sizes:
                result = joint_search(prober.probe, budget, sizes, imgsz, max_amount=t.max_amount,
                                      tolerance=t.tolerance, max_evals=t.max_evals, on_point=on_point)
            else:
                result = search(prober, budget, max_amount=t.max_amount, tolerance=t.tolerance,
                                max_evals=t.max_evals, on_point=on_point)
        finally:
            bar.close()
    finally:
        prober.close()
    n, total = prober.images, prober.val_images
    seconds = time.perf_counter() - t0
    LOGGER.info("Budget search (%d evaluations, %.1fs):\n%s", result.evaluations, seconds, format_trace(result, budget))
    point = result.chosen or (result.closest if t.write_best_effort else None)
    if point is None:
        closest = f"closest: {describe(result.closest, budget)}" if result.closest else "no amount could be pruned"
        raise BudgetError(f"target: no amount in [0, {t.max_amount}] meets {limits_text(budget)} "
                          f"({result.evaluations} evaluations, {result.reason}); {closest}; nothing written "
                          "(target.write_best_effort: true writes the closest point)")
    if result.chosen is None:
        LOGGER.warning("yolo_prune_plugin: no amount meets the budget; writing the closest point "
                       "(target.write_best_effort): %s", describe(point, budget))
    model, done = kept[(point.imgsz, point.amount)]  # done None: a resize-only point, nothing pruned
    section = _section(config, full, result, point, dense, n, total, seconds)
    if t.after_finetune:
        section["after_finetune"] = {"epochs": t.after_finetune, "search_limits": budget.to_dict(),
                                     "max_drop_on": "fine-tuned model" if budget.max_drop is None and
                                     full.max_drop is not None else "one-shot probes and the fine-tuned model"}
    if sizes:
        section.update(_imgsz_section(result, point, budget, imgsz))
    if any(p.speedup is not None for p in result.trace):
        LOGGER.info("Budget: accuracy against speed (retention of the dense mAP50-95 on the search images; * = no "
                    "other point is as fast and more accurate):\n%s", frontier_text(section))
    return SearchOutcome(section, model, done, dense, n == total)


def search_sizes(imgsz_option: object, imgsz: int, stride: int) -> list[int]:
    """The input sizes ``target.imgsz`` asks for (``auto``: :func:`auto_sizes`); [] when it is not set."""
    if imgsz_option is None:
        return []
    return auto_sizes(imgsz, stride) if imgsz_option == "auto" else list(imgsz_option)


def _best_so_far(trace: list[Point], budget: Budget, joint: bool) -> Optional[Point]:
    """The point whose model is kept in memory while the search goes on."""
    return (pick_most_accurate if joint else pick)(trace, budget)[1]


def _imgsz_section(result: JointResult, point: Point, budget: Budget, imgsz: int) -> dict:
    """The input-size part of the report's ``target``: the sizes searched, the deploy size and the resize-only
    baseline (the most accurate dense model at a lower ``--img`` that is at least as fast as the chosen point)."""
    deploy = point.imgsz or imgsz
    base = result.resize_baseline
    if point.amount == 0:
        verdict = (f"resizing alone wins: the dense model at --img {deploy} is the most accurate point that meets "
                   f"{limits_text(budget)}")
    elif base is None:
        verdict = f"no resize-only point is as fast as the chosen one ({point.speedup}x)"
    else:
        verdict = (f"dense at --img {base.imgsz or imgsz}: {base.speedup}x faster, keeps "
                   f"{base.metrics['mAP50-95'] / budget.dense_map:.3f}; chosen: {point.speedup}x, keeps "
                   f"{point.metrics['mAP50-95'] / budget.dense_map:.3f}" if budget.dense_map > 0 else "")
    LOGGER.info("Budget: deploy at --img %d (%s); %s", deploy,
                "resized, not pruned" if point.amount == 0 else f"amount {point.amount:.3f}", verdict)
    return {"imgsz": {"searched": result.sizes, "joint": result.joint_sizes, "evaluation": imgsz},
            "deploy_imgsz": deploy, "resize_baseline": base.to_dict() if base else None, "versus_resize": verdict}


def _section(config: PruneConfig, budget: Budget, result: SearchResult, point: Point, dense: Metrics, n: int,
             total: int, seconds: float) -> dict:
    t = config.target
    return {"options": dataclasses.asdict(t), "budget": budget.to_dict(), "met": result.chosen is not None,
            "amount": point.amount, "chosen": point.to_dict(), "trace": [p.to_dict() for p in result.trace],
            "evaluations": result.evaluations, "seconds": round(seconds, 1), "stopped": result.reason,
            "search_images": n, "val_images": total,
            "runtime": f"{t.runtime} ({t.threads} thread{'s' if t.threads > 1 else ''})"
            if config.structure == "channel" else None,
            "dense_search": {k: dense.to_dict()[k] for k in METRIC_KEYS}, "selection_bias": BIAS_NOTE, "final": None}


def final_check(section: dict, before: Optional[dict], after: Optional[dict], finetuned: bool) -> Optional[dict]:
    """The budget re-checked with the written file's full-val metrics (and the search's speed-up/size, which the
    file keeps: same architecture); None without both metrics."""
    if not before or not after:
        return None
    b = section["budget"]
    opts = section["options"]
    limit = b["max_drop"]
    if limit is not None and opts.get("relative"):
        limit = opts["max_drop"] * before["mAP50-95"]  # relative to the full-val dense number
    drop = before["mAP50-95"] - after["mAP50-95"]
    chosen = section["chosen"]
    speed_ok = b["min_speedup"] is None or (chosen.get("speedup") or 0) >= b["min_speedup"]
    size_ok = b["max_size"] is None or (chosen.get("size") or 1) <= b["max_size"]
    meets = (limit is None or drop <= limit + 1e-9) and speed_ok and size_ok
    return {"on": "fine-tuned model" if finetuned else "one-shot model", "dense": before["mAP50-95"],
            "mAP50-95": after["mAP50-95"], "drop": round(drop, 6), "max_drop": limit, "meets": meets,
            "search_drop": chosen.get("drop")}


def recheck_budget(entry: ReportEntry) -> None:
    """The budget re-checked on the written file's full-val metrics (after fine-tuning when there was one)."""
    if entry.target and entry.target.get("after_finetune") and not entry.finetune:
        entry.target["one_shot"] = final_check(entry.target, entry.metrics_before, entry.metrics_after, False)
    elif entry.target:
        entry.target["final"] = final_check(entry.target, entry.metrics_before, entry.metrics_after,
                                            finetuned=bool(entry.finetune))
        log_final(entry.target)


def log_final(section: dict) -> None:
    f = section.get("final")
    if not f:
        return
    limit = "" if f["max_drop"] is None else f" vs limit {f['max_drop']:.4f}"
    search_drop = "-" if f["search_drop"] is None else f"{f['search_drop']:+.4f}"
    text = (f"Budget on the full val set ({f['on']}): mAP50-95 {f['mAP50-95']:.4f}, drop {f['drop']:+.4f} "
            f"(search: {search_drop}){limit}")
    (LOGGER.info if f["meets"] else LOGGER.warning)("%s: %s", text, "held" if f["meets"] else "NOT held")


__all__ = ["budget_search", "BudgetError", "SearchOutcome", "check_target", "final_check", "log_final",
           "recheck_budget", "Prober", "search_settings", "search_sizes", "model_stride", "SEARCH_RUNS"]
