"""Sparsity sweep: every (method, amount) point evaluated in one process.

The checkpoint is loaded once, the validation images are decoded and letterboxed once (kept in memory as
ready batches), calibration images (for data-aware methods) are loaded once; each point is then a prune
of a copy of the model plus YOLOv5's ``val.run`` on those batches. Outputs: ``sweep.csv``, ``sweep.json``,
``sweep.png`` (mAP vs sparsity, one line per method, dense baseline marked) and ``layers.png`` (per-layer
sparsity of one chosen point).
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .. import __version__
from ..backend.checks import check_device, check_model_matches_data
from ..backend.evaluation import EvalSettings, evaluate, make_dataloader, make_settings
from ..backend.loading import Backend, get_backend, load_checkpoint
from ..config import DATA_AWARE_METHODS, PruneConfig, config_from_dict
from ..errors import ConfigError
from ..prune.unstructured import check_scope, prune_model
from ..utils.files import atomic_path, atomic_write_text, write_json
from ..utils.progress import progress

LOGGER = logging.getLogger("yolo_prune_plugin")
CSV_FIELDS = ("method", "amount", "sparsity", "P", "R", "mAP50", "mAP50-95", "retention", "prune_s", "eval_s")


def parse_points(amounts: Sequence[float] | str, methods: Sequence[str] | str) -> tuple[tuple[float, ...], tuple[str, ...]]:
    """Validate ``--amounts``/``--methods`` (lists or comma-separated strings) through the config rules."""
    sweep = config_from_dict({"sweep": {"amounts": amounts, "methods": methods}}, source="sweep").sweep
    if not sweep.amounts:
        raise ConfigError("sweep: 'amounts' must list at least one fraction in [0, 1)")
    if not sweep.methods:
        raise ConfigError("sweep: 'methods' must list at least one method")
    return sweep.amounts, sweep.methods


class CachedBatches:
    """The val set decoded and letterboxed once, replayed as a ``val.run`` dataloader.

    ``val.run`` scales ``targets`` in place, so every pass gets fresh copies of them.
    """

    def __init__(self, dataloader: Any):
        self.batches = [(im, targets, paths, shapes) for im, targets, paths, shapes in dataloader]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for im, targets, paths, shapes in self.batches:
            yield im, targets.clone(), paths, shapes


def _batches(settings: EvalSettings, stride: int, backend: Backend) -> CachedBatches:
    return CachedBatches(make_dataloader(settings, stride, backend))


def _fused(model: torch.nn.Module) -> torch.nn.Module:
    model = model.eval()
    return model.fuse() if hasattr(model, "fuse") else model


def sweep_model(src: torch.nn.Module, settings: EvalSettings, amounts: Sequence[float], methods: Sequence[str],
                config: Optional[PruneConfig] = None, backend: Optional[Backend] = None,
                echo: Callable[[str], None] = print) -> dict:
    """Evaluate the dense ``src`` model and every (method, amount) point; returns the sweep data (no files)."""
    backend = backend or get_backend()
    config = config or PruneConfig()
    check_scope(src, config.include, config.exclude)
    t_all = time.perf_counter()
    stride = max(int(src.stride.max()), 32) if hasattr(src, "stride") else 32
    batches = _batches(settings, stride, backend)
    calibration = None
    if any(m in DATA_AWARE_METHODS for m in methods):
        from ..prune.calibration import load_calibration_images

        c = config.calibration
        calibration = load_calibration_images(settings.data, settings.imgsz, n=c.images, batch_size=c.batch_size,
                                              seed=c.seed, device=settings.device, allow_overlap=c.allow_overlap)
    base = copy.deepcopy(src).float().to(settings.device)
    t0 = time.perf_counter()
    dense = evaluate(_fused(copy.deepcopy(base)), settings, batches, backend)
    echo(f"[dense] mAP50-95={dense.map:.4f} mAP50={dense.map50:.4f} ({time.perf_counter() - t0:.1f}s)")
    rows, layers = [], {}
    n = len(methods) * len(amounts)
    points = [(m, a) for m in methods for a in amounts]
    for i, (method, amount) in enumerate(progress(points, desc="sweep", total=n), 1):
        model = copy.deepcopy(base)
        res = prune_model(model, amount, method, config.include, config.exclude, calibration=calibration, log=False,
                          options=config.obs)
        t0 = time.perf_counter()
        m = evaluate(_fused(model), settings, batches, backend)
        eval_s = time.perf_counter() - t0
        row = {"method": method, "amount": amount, "sparsity": round(res.after.sparsity, 6), **m.to_dict(),
               "retention": round(m.map / dense.map, 4) if dense.map > 0 else None,
               "prune_s": round(res.seconds, 3), "eval_s": round(eval_s, 2)}
        rows.append(row)
        layers[f"{method}:{amount}"] = [s.to_dict() for s in res.after.layers]
        echo(f"[{i}/{n}] method={method:<9} amount={amount:.2f} sparsity={100 * res.after.sparsity:6.2f}% "
             f"mAP50-95={m.map:.4f} mAP50={m.map50:.4f} retention={row['retention']} "
             f"(prune {res.seconds:.2f}s, val {eval_s:.1f}s)")
    return {"dense": dense.to_dict(), "points": rows, "layers": layers,
            "settings": {"imgsz": settings.imgsz, "batch_size": settings.batch_size, "iou_thres": settings.iou_thres,
                         "device": str(settings.device)},
            "seconds": round(time.perf_counter() - t_all, 2)}


def write_outputs(result: dict, out: Path, layers_point: Optional[str] = None) -> dict[str, Path]:
    """Write sweep.csv, sweep.json, sweep.png and layers.png into ``out`` (atomically, file by file)."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(result["points"])
    paths = {"csv": out / "sweep.csv", "json": out / "sweep.json", "png": out / "sweep.png",
             "layers": out / "layers.png"}
    atomic_write_text(buf.getvalue(), paths["csv"])
    point = layers_point or _default_point(result)
    if point not in result["layers"]:
        raise ConfigError(f"--layers-point {point!r} is not a swept point (choose from {', '.join(result['layers'])})")
    result["layers_point"] = point
    write_json({**result, "version": __version__}, paths["json"])
    _plot_sweep(result, paths["png"])
    _plot_layers(result["layers"][point], point, paths["layers"])
    return paths


def _default_point(result: dict) -> str:
    """The first method at 0.5, else the first method's largest amount."""
    keys = list(result["layers"])
    first = [k for k in keys if k.split(":")[0] == keys[0].split(":")[0]]
    half = [k for k in first if abs(float(k.split(":")[1]) - 0.5) < 1e-9]
    return half[0] if half else max(first, key=lambda k: float(k.split(":")[1]))


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, dest: Path, title: Optional[str] = None) -> None:
    """``fig`` (with ``title`` above) written to ``dest`` as PNG atomically, then closed."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _plt().close(fig)


def _plot_sweep(result: dict, dest: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(dict.fromkeys(r["method"] for r in result["points"]))
    for ax, key in zip(axes, ("mAP50-95", "mAP50")):
        for method in methods:
            pts = sorted((r["sparsity"], r[key]) for r in result["points"] if r["method"] == method)
            xs, ys = [0.0] + [p[0] for p in pts], [result["dense"][key]] + [p[1] for p in pts]
            ax.plot([100 * x for x in xs], ys, marker="o", label=method)
        ax.axhline(result["dense"][key], color="gray", ls="--", lw=1, label=f"dense {result['dense'][key]:.3f}")
        ax.set_xlabel("global Conv2d sparsity (%)")
        ax.set_ylabel(key)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, dest, f"Accuracy vs sparsity (imgsz {result['settings']['imgsz']})")


def _plot_layers(layers: list[dict], point: str, dest: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(8, 0.16 * len(layers)), 4))
    ax.bar(range(len(layers)), [100 * s["sparsity"] for s in layers], color="tab:blue")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([s["name"].replace("model.", "") for s in layers], rotation=90, fontsize=6)
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Per-layer Conv2d sparsity at {point}")
    save_figure(fig, dest)


def run_sweep(weights: str | Path, data: str | Path | dict, amounts: Sequence[float] | str = "0.1,0.3,0.5",
              methods: Sequence[str] | str = "global", imgsz: int = 640, batch_size: int = 32, device: Any = "",
              workers: int = 8, out: str | Path | None = None, layers_point: Optional[str] = None,
              exist_ok: bool = False, config: Optional[PruneConfig] = None, settings: Optional[EvalSettings] = None,
              backend: Optional[Backend] = None, echo: Callable[[str], None] = print,
              ckpt: Optional[dict] = None) -> dict:
    """``yolo-prune sweep``: sweep a checkpoint and write the outputs (a new folder unless ``exist_ok``).

    ``ckpt``: ``weights`` already loaded (the train-end hook passes it: the file is not read again)."""
    backend = backend or get_backend()
    amounts_t, methods_t = parse_points(amounts, methods)
    weights = Path(weights).expanduser().resolve()
    src = ckpt if ckpt is not None else load_checkpoint(weights, backend)
    src = src.get("ema") or src["model"]
    if settings is None:
        check_device(device)
        settings = make_settings(data, imgsz, batch_size, device, False, workers, backend)
    check_model_matches_data(src, settings.data, weights, data if not isinstance(data, dict) else None,
                             settings.single_cls)
    folder = Path(out) if out else weights.parent / "sweep"
    folder = Path(backend.general.increment_path(folder, exist_ok=exist_ok))  # never overwrite an earlier sweep
    result = sweep_model(src, settings, amounts_t, methods_t, config, backend, echo)
    result["checkpoint"] = str(weights)
    paths = write_outputs(result, folder, layers_point)
    echo(f"Sweep of {len(result['points'])} points in {result['seconds']:.1f}s -> {folder}")
    result["outputs"] = {k: str(v) for k, v in paths.items()}
    return result
