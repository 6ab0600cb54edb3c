"""The one code path behind the train-end hook and ``yolo-prune prune``.

load checkpoint -> prune -> save ``<stem><suffix>.pt`` (atomically) -> evaluate with YOLOv5's validator ->
export (optional) -> ``prune_report.json`` + printed table.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from . import __version__
from .adapter import Backend, get_backend, load_checkpoint
from .config import DATA_AWARE_METHODS, PruneConfig, config_equal
from .errors import OutputExistsError, PruneError
from .evaluation import EvalSettings, Metrics, evaluate_weights
from .pruning import PruneResult, conv_layers, prune_model, sparsity_stats
from .report import atomic_path, atomic_torch_save, print_report, write_json

LOGGER = logging.getLogger("yolo_prune_plugin")
REPORT_NAME = "prune_report.json"


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


def prune_checkpoint(weights: str | Path, config: PruneConfig, settings: Optional[EvalSettings] = None,
                     before: Optional[Metrics] = None, backend: Optional[Backend] = None,
                     device: Any = None, imgsz: Optional[int] = None) -> dict:
    """Prune one YOLOv5 checkpoint file and write ``<stem><suffix>.pt`` beside it.

    ``settings`` (data, image size, device, ...) is needed for evaluation and data-aware methods; ``before``
    reuses metrics YOLOv5 already computed for ``weights`` instead of validating it again. Returns the report
    entry (also stored under the pruned checkpoint's ``prune`` key).
    """
    backend = backend or get_backend()
    weights = Path(weights).expanduser().resolve()
    out = output_path(weights, config)
    check_output_free(out, config, backend)
    ckpt = load_checkpoint(weights, backend)
    device = settings.device if settings is not None else torch.device(device or "cpu")
    imgsz = settings.imgsz if settings is not None else (imgsz or 640)

    src = ckpt.get("ema") or ckpt["model"]
    saved_dtype = next(src.parameters()).dtype
    model = copy.deepcopy(src).float().to(device)
    calibration = None
    if config.method in DATA_AWARE_METHODS:
        if settings is None:
            raise PruneError(f"method {config.method!r} needs calibration images: pass --data")
        from .calibration import load_calibration_images

        c = config.calibration
        calibration = load_calibration_images(settings.data, settings.imgsz, n=c.images, batch_size=c.batch_size,
                                              seed=c.seed, device=device, allow_overlap=c.allow_overlap)
    result: PruneResult = prune_model(model, config.amount, config.method, config.include, config.exclude,
                                      calibration=calibration)
    pruned = model.to("cpu").to(saved_dtype)  # the dtype/format YOLOv5 writes (fp16)
    for p in pruned.parameters():
        p.requires_grad_(False)
    layers = conv_layers(pruned, config.include, config.exclude)
    after_stats = sparsity_stats(pruned, layers)  # measured in the saved dtype
    all_after = sparsity_stats(pruned)

    entry: dict[str, Any] = {
        "checkpoint": str(weights), "output": str(out), "method": config.method, "amount": config.amount,
        "device": str(device), "prune_seconds": round(result.seconds, 3),
        "sparsity_before": result.before.to_dict(per_layer=False),
        "sparsity_after": after_stats.to_dict(per_layer=True),
        "sparsity_all_conv": all_after.to_dict(per_layer=False),
        "metrics_before": before.to_dict() if before else None, "metrics_after": None,
        "method_details": result.extra,
    }
    new = {k: v for k, v in ckpt.items() if k not in ("model", "ema", "optimizer", "updates", "prune")}
    new.update(model=pruned, ema=None, optimizer=None, updates=None)
    new["prune"] = {"version": __version__, "config": config.to_dict(),
                    "date": _dt.datetime.now().isoformat(timespec="seconds"), **entry}

    with atomic_path(out) as tmp:
        torch.save(new, tmp)
        if config.evaluate and settings is not None:
            if before is None:
                LOGGER.info("Validating %s (before pruning)...", weights.name)
                before = evaluate_weights(weights, settings, backend=backend)
                entry["metrics_before"] = before.to_dict()
            LOGGER.info("Validating %s (after pruning)...", out.name)
            after = evaluate_weights(tmp, settings, backend=backend)  # loaded exactly as YOLOv5 loads it
            entry["metrics_after"] = after.to_dict()
            entry["eval"] = {"imgsz": settings.imgsz, "batch_size": settings.batch_size,
                             "iou_thres": settings.iou_thres, "half": settings.half}
            new["prune"].update(entry)
            torch.save(new, tmp)
    LOGGER.info("Saved %s", out)

    if config.export:
        from .export import export_and_verify

        o = config.export_options
        arts = export_and_verify(out, config.export, imgsz=imgsz, device=str(device.index if device.type == "cuda"
                                                                               else "cpu"),
                                 half=o.half, dynamic=o.dynamic, simplify=o.simplify, opset=o.opset, atol=o.atol,
                                 overwrite=True)
        entry["exports"] = [a.to_dict() for a in arts]
    return entry


def check_exports(entries: list[dict]) -> None:
    """Raise :class:`PruneError` if any exported artefact failed verification (after the report is written)."""
    failed = [a for e in entries for a in e.get("exports", []) if not a.get("ok")]
    if failed:
        raise PruneError("export verification failed for " +
                         ", ".join(f"{a['format']} ({a.get('message')})" for a in failed))


def write_report(entries: list[dict], config: PruneConfig, report_dir: str | Path, extra: Optional[dict] = None,
                 echo: Any = None) -> Path:
    """Write ``prune_report.json`` in ``report_dir`` and print the before/after table(s)."""
    path = Path(report_dir) / REPORT_NAME
    data = {"plugin": "yolo_prune_plugin", "version": __version__,
            "created": _dt.datetime.now().isoformat(timespec="seconds"), "config": config.to_dict(),
            "results": entries, **(extra or {})}
    write_json(data, path)
    print_report(entries, echo=echo)
    LOGGER.info("Report written to %s", path)
    return path
