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
import csv
import dataclasses
import io
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
from ..backend.evaluation import EvalSettings, Metrics, evaluate
from ..backend.loading import Backend
from ..backend.patches import muted_yolov5
from ..config import PruneConfig
from ..errors import BudgetError, ConfigError, PruneError
from ..prune.unstructured import count_parameters
from ..report import ReportEntry
from ..utils.files import atomic_write_text
from ..utils.progress import progress
from .bench import bench_input, make_runner, require_onnxruntime, time_side_by_side, torch_threads
from .budget import METRIC_KEYS, Budget, Point, SearchResult, describe, format_trace, limits_text, pick, search
from .sweep import CachedBatches, _fused, _plt, save_figure

LOGGER = logging.getLogger("yolo_prune_plugin")

#: timed rounds (each model once per round, round-robin) and untimed calls per probe
SEARCH_RUNS, SEARCH_WARMUP = 20, 3

BIAS_NOTE = ("the amount was chosen on validation images (selection bias): the search numbers are optimistic; "
             "'final' is the chosen file on the full val set, and only held-out images give an unbiased number")


def check_target(config: PruneConfig) -> None:
    """Checks of ``target`` that need the environment (raised before the first epoch by ``api.preflight``)."""
    t = config.target
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

    def measure(self, model: nn.Module) -> tuple[float, float, Optional[float]]:
        """(median ms, dense median / median, .onnx bytes ratio or None) of ``model``."""
        self.count += 1
        d = self.tmp / f"probe{self.count}"
        d.mkdir()
        f = d / "probe.pt"
        torch.save({"model": copy.deepcopy(model).float().cpu(), "ema": None}, f)
        try:
            with torch_threads(self.threads):
                row, fns = make_runner(f, d / "onnx", self.x, self.backends, self.device, self.threads, self.backend)
                dense_t, t = time_side_by_side([{self.runtime: self.dense_fns[self.runtime]},
                                                {self.runtime: fns[self.runtime]}], SEARCH_RUNS, SEARCH_WARMUP)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        ms, dense_ms = _median(t[self.runtime]), _median(dense_t[self.runtime])
        onnx = row["onnx_bytes"] / self.dense_row["onnx_bytes"] if row.get("onnx_bytes") else None
        return round(ms, 3), round(dense_ms / ms, 3), onnx


def _median(ms: list[float]) -> float:
    return float(sorted(ms)[len(ms) // 2])


class Prober:
    """One evaluation set decoded once, the dense model evaluated once (``dense``), then ``prober(amount)``: the
    pipeline's prune at that amount, evaluated, and timed side by side with the dense model (channel); the
    pruned model of the last call is ``last``. ``close()`` deletes the temporary files."""

    def __init__(self, source: Path, dense_model: nn.Module, prune_fn: Callable[[float], tuple[nn.Module, dict]],
                 config: PruneConfig, settings: EvalSettings, backend: Backend, imgsz: int):
        from ..backend.evaluation import make_dataloader

        t = config.target
        self.prune_fn, self.config, self.backend = prune_fn, config, backend
        self.tmp = Path(tempfile.mkdtemp(prefix="yolo-prune-budget-"))
        try:
            self.settings, self.images, self.val_images = search_settings(settings, t.search_images, t.seed, self.tmp)
            stride = max(int(dense_model.stride.max()), 32) if hasattr(dense_model, "stride") else 32
            with muted_yolov5(backend):  # its label scan would name the temporary list of search images
                self.batches = CachedBatches(make_dataloader(self.settings, stride, backend))
            self.dense = self.evaluate(copy.deepcopy(dense_model).float().to(self.settings.device))
            self.timer = (_Timer(source, config, imgsz, self.settings.device, backend, self.tmp)
                          if config.structure == "channel" else None)
        except BaseException:
            self.close()
            raise
        self.dense_params = count_parameters(dense_model)
        self.last: Optional[tuple[nn.Module, dict]] = None

    def evaluate(self, model: nn.Module) -> Metrics:
        """``model`` (fused copy) on the search images; YOLOv5's fusing/validation output muted (warnings pass)."""
        with muted_yolov5(self.backend):
            return evaluate(_fused(copy.deepcopy(model)), self.settings, self.batches, self.backend)

    def __call__(self, a: float) -> Point:
        t1 = time.perf_counter()
        self.last = None
        try:
            model, done = self.prune_fn(a)
        except PruneError as e:
            return Point(a, {}, error=str(e), seconds=round(time.perf_counter() - t1, 2))
        m = self.evaluate(model).to_dict()
        lat = self.timer.measure(model) if self.timer is not None else (None, None, None)
        channel = self.config.structure == "channel"
        params = count_parameters(model)
        size = params / self.dense_params if self.config.target.size_of == "params" else lat[2]
        self.last = (model, done)
        return Point(a, {k: m[k] for k in METRIC_KEYS}, latency_ms=lat[0], speedup=lat[1], params=params,
                     size=round(size, 4) if channel and size is not None else None,
                     seconds=round(time.perf_counter() - t1, 2))

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
        budget = Budget.from_target(t, dense.map)
        LOGGER.info("Budget search: %s (dense mAP50-95 %.4f on %d val images), amount in [0, %s], at most %d "
                    "one-shot prunes", limits_text(budget), dense.map, prober.images, t.max_amount, t.max_evals)
        kept: dict[float, tuple[nn.Module, dict]] = {}
        trace: list[Point] = []
        bar = progress(desc="budget", total=t.max_evals)

        def on_point(p: Point) -> None:
            trace.append(p)
            if prober.last is not None:
                kept[p.amount] = prober.last
            keep = pick(trace, budget)[1]
            for a in [a for a in kept if keep is None or a != keep.amount]:
                del kept[a]  # only the best point so far keeps its model in memory
            bar.update(1)
            bar.set_postfix_str(describe(p, budget) if not p.error else f"amount {p.amount}: not pruned")

        try:
            result = search(prober, budget, max_amount=t.max_amount, tolerance=t.tolerance, max_evals=t.max_evals,
                            on_point=on_point)
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
    model, done = kept[point.amount]
    section = _section(config, budget, result, point, dense, n, total, seconds)
    return SearchOutcome(section, model, done, dense, n == total)


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
    if entry.target:
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


# ---------------------------------------------------------------------------------------------- outputs
def write_budget_files(section: dict, folder: Path, stem: str) -> dict[str, str]:
    """``budget_<stem>.csv`` (every point) and ``budget_<stem>.png`` in ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = ("amount", *METRIC_KEYS, "drop", "latency_ms", "speedup", "size", "params", "seconds", "meets", "chosen",
            "error")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for p in section["trace"]:
        w.writerow({**p, **p["metrics"], "chosen": p["amount"] == section["amount"]})
    paths = {"csv": folder / f"budget_{stem}.csv", "png": folder / f"budget_{stem}.png"}
    atomic_write_text(buf.getvalue(), paths["csv"])
    plot_budget(section, paths["png"])
    return {k: str(v) for k, v in paths.items()}


def plot_budget(section: dict, dest: Path) -> None:
    """mAP50-95 against speed-up (or amount when nothing was timed), and against size when measured; the dense
    model, the budget lines and the chosen point drawn."""
    plt = _plt()
    pts = [p for p in section["trace"] if not p.get("error")]
    b, dense = section["budget"], section["dense_search"]["mAP50-95"]
    timed = any(p.get("speedup") is not None for p in pts)
    sized = any(p.get("size") is not None for p in pts)
    panels = [("speedup", "speed-up (dense latency / pruned)", 1.0, b["min_speedup"])] if timed else \
        [("amount", "amount", 0.0, None)]
    if sized:
        panels.append(("size", "size (pruned / dense)", 1.0, b["max_size"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, label, dense_x, limit) in zip(axes[0], panels):
        ax.scatter([p[key] for p in pts], [p["metrics"]["mAP50-95"] for p in pts],
                   c=["tab:green" if p["meets"] else "tab:red" for p in pts], zorder=3, label="one-shot probes")
        for p in pts:
            ax.annotate(f"{p['amount']:.2f}", (p[key], p["metrics"]["mAP50-95"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.scatter([dense_x], [dense], marker="s", color="black", zorder=3, label=f"dense {dense:.3f}")
        c = section["chosen"]
        if c.get(key) is not None:
            ax.scatter([c[key]], [c["metrics"]["mAP50-95"]], marker="*", s=220, color="gold", edgecolors="black",
                       zorder=4, label=f"chosen: amount {c['amount']:.3f}")
        if b["max_drop"] is not None:
            ax.axhline(dense - b["max_drop"], color="tab:blue", ls="--", lw=1, label=f"max drop {b['max_drop']:.3f}")
        if limit is not None:
            ax.axvline(limit, color="tab:purple", ls="--", lw=1, label=f"limit {limit}")
        ax.set_xlabel(label)
        ax.set_ylabel("mAP50-95 (search images)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, dest, f"Budget search: {section['evaluations']} one-shot prunes in {section['seconds']:.0f}s")


__all__ = ["budget_search", "BudgetError", "SearchOutcome", "check_target", "final_check", "log_final",
           "write_budget_files", "plot_budget", "recheck_budget", "Prober", "search_settings", "SEARCH_RUNS"]
