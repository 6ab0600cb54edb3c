"""Pruning results where YOLOv5 users look for results: TensorBoard, a CSV beside ``results.csv``, and the
experiment trackers YOLOv5 already has active (W&B, ClearML, Comet).

:func:`log_results` writes, in the run folder:

- TensorBoard events (``events.out.tfevents.*.yolo_prune``; ``tensorboard --logdir runs/train`` shows them
  beside YOLOv5's own curves): ``prune/<stem>/before/<metric>`` and ``prune/<stem>/after/<metric>`` for P, R,
  mAP50, mAP50-95 and sparsity; per-epoch ``prune/history/<key>`` (sparsity, mAP, leak counts) for
  fine-tuning/schedule runs; ``sweep/<method>/<metric>`` (step = amount in %) and the sweep/per-layer plots
  as images;
- ``prune_results.csv``: one row per pruned checkpoint, before and after side by side.

The same scalars go to W&B/ClearML/Comet when YOLOv5's ``Loggers`` has them running (found on the
``Callbacks`` object through its bound methods); anything unavailable (no tensorboard, offline tracker) is
skipped, never fatal.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from ..utils.files import atomic_write_text

LOGGER = logging.getLogger("yolo_prune_plugin")


CSV_NAME = "prune_results.csv"


EVENTS_SUFFIX = ".yolo_prune"


METRICS = ("P", "R", "mAP50", "mAP50-95")


CSV_FIELDS = ("checkpoint", "output", "method", "amount", "sparsity_before", "sparsity_after",
              *(f"{m}_{s}" for m in METRICS for s in ("before", "after")), "nonzero_before", "nonzero_after")


def entry_scalars(entry: Mapping[str, Any]) -> dict[str, float]:
    """``{"prune/best/before/mAP50": ..., "prune/best/after/sparsity": ...}`` for one report entry."""
    stem = Path(str(entry.get("checkpoint", "model"))).stem
    out: dict[str, float] = {}
    for stage in ("before", "after"):
        metrics = entry.get(f"metrics_{stage}") or {}
        for m in METRICS:
            if metrics.get(m) is not None:
                out[f"prune/{stem}/{stage}/{m}"] = float(metrics[m])
        sp = (entry.get(f"sparsity_{stage}") or {}).get("sparsity")
        if sp is not None:
            out[f"prune/{stem}/{stage}/sparsity"] = float(sp)
    return out


def history_scalars(history: Iterable[Mapping[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """Per-epoch ``prune/history/<key>`` scalars of a fine-tune or schedule run (leak dicts are summed)."""
    out = []
    for row in history or []:
        vals: dict[str, float] = {}
        for k, v in row.items():
            if k == "epoch":
                continue
            if isinstance(v, Mapping):  # {"model": 0, "ema": 0}
                nums = [x for x in v.values() if isinstance(x, (int, float))]
                if nums:
                    vals[f"prune/history/{k}"] = float(sum(nums))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                vals[f"prune/history/{k}"] = float(v)
        out.append((int(row.get("epoch", len(out))), vals))
    return out


def sweep_scalars(sweep: Mapping[str, Any]) -> list[tuple[int, dict[str, float]]]:
    """Per-point ``sweep/<method>/<metric>`` scalars, step = amount in percent."""
    out = []
    for p in sweep.get("points") or []:
        step = int(round(100 * float(p["amount"])))
        vals = {f"sweep/{p['method']}/{k}": float(p[k]) for k in (*METRICS, "sparsity", "retention")
                if p.get(k) is not None}
        out.append((step, vals))
    return out


def write_csv(save_dir: str | Path, entries: Iterable[Mapping[str, Any]]) -> Path:
    """``prune_results.csv`` in ``save_dir`` (beside YOLOv5's ``results.csv``), written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for e in entries:
        row: dict[str, Any] = {"checkpoint": e.get("checkpoint"), "output": e.get("output"),
                               "method": e.get("method"), "amount": e.get("amount")}
        for stage in ("before", "after"):
            sp = e.get(f"sparsity_{stage}") or {}
            row[f"sparsity_{stage}"] = sp.get("sparsity")
            row[f"nonzero_{stage}"] = sp.get("nonzero")
            for m in METRICS:
                row[f"{m}_{stage}"] = (e.get(f"metrics_{stage}") or {}).get(m)
        w.writerow(row)
    path = Path(save_dir) / CSV_NAME
    atomic_write_text(buf.getvalue(), path)
    return path


def _png(path: str | Path) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def write_tensorboard(save_dir: str | Path, entries: Iterable[Mapping[str, Any]],
                      history: Optional[Iterable[Mapping[str, Any]]] = None,
                      sweep: Optional[Mapping[str, Any]] = None,
                      images: Optional[Mapping[str, str | Path]] = None) -> Optional[Path]:
    """TensorBoard events in ``save_dir`` (``images``: tag -> PNG file, e.g. the budget plot); returns the events
    file, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time
        LOGGER.debug("tensorboard not installed: no TensorBoard events for the pruning results")
        return None
    w = SummaryWriter(log_dir=str(save_dir), filename_suffix=EVENTS_SUFFIX)
    try:
        for e in entries:
            for tag, v in entry_scalars(e).items():
                w.add_scalar(tag, v, 0)
        for step, vals in history_scalars(history or []):
            for tag, v in vals.items():
                w.add_scalar(tag, v, step)
        if sweep:
            for step, vals in sweep_scalars(sweep):
                for tag, v in vals.items():
                    w.add_scalar(tag, v, step)
            for key, tag in (("png", "sweep/accuracy_vs_sparsity"), ("layers", "sweep/per_layer_sparsity")):
                f = (sweep.get("outputs") or {}).get(key)
                if f and Path(f).is_file():
                    w.add_image(tag, _png(f), 0, dataformats="HWC")
        for tag, f in (images or {}).items():
            if Path(f).is_file():
                w.add_image(tag, _png(f), 0, dataformats="HWC")
        w.flush()
        return Path(w.file_writer.event_writer._file_name)  # type: ignore[union-attr]
    finally:
        w.close()


def find_yolo_loggers(callbacks: Any) -> Any:
    """YOLOv5's ``Loggers`` instance registered on a ``Callbacks`` object (its bound methods' ``__self__``)."""
    for actions in (getattr(callbacks, "_callbacks", None) or {}).values():
        for a in actions:
            owner = getattr(a.get("callback"), "__self__", None)
            if owner is not None and type(owner).__name__ == "Loggers":
                return owner
    return None


def send_to_trackers(yolo_loggers: Any, scalars: Mapping[str, float], step: int = 0) -> list[str]:
    """Send ``scalars`` to the W&B/ClearML/Comet runs YOLOv5 has open; returns the trackers that took them."""
    sent = []
    if yolo_loggers is None or not scalars:
        return sent
    wb = getattr(getattr(yolo_loggers, "wandb", None), "wandb_run", None)
    clearml = getattr(getattr(yolo_loggers, "clearml", None), "task", None)
    comet = getattr(getattr(yolo_loggers, "comet_logger", None), "experiment", None)
    for name, target, send in (
        ("wandb", wb, lambda t: t.log(dict(scalars))),
        ("clearml", clearml, lambda t: [t.get_logger().report_scalar(k.rsplit("/", 1)[0], k.rsplit("/", 1)[-1], v,
                                                                     step) for k, v in scalars.items()]),
        ("comet", comet, lambda t: t.log_metrics(dict(scalars), step=step)),
    ):
        if target is None:
            continue
        try:
            send(target)
            sent.append(name)
        except Exception as e:  # noqa: BLE001 - an offline tracker must not break the report
            LOGGER.debug("could not send pruning results to %s: %s", name, e)
    return sent


def log_results(save_dir: str | Path, entries: Iterable[Mapping[str, Any]],
                history: Optional[Iterable[Mapping[str, Any]]] = None, sweep: Optional[Mapping[str, Any]] = None,
                yolo_loggers: Any = None, images: Optional[Mapping[str, str | Path]] = None) -> dict[str, Any]:
    """Write TensorBoard events and ``prune_results.csv`` in ``save_dir``; send the scalars to YOLOv5's trackers.

    Never raises for a logging problem (it is reported at WARNING); returns ``{"csv": path, "events": path or
    None, "trackers": [...]}``.
    """
    entries = list(entries)
    out: dict[str, Any] = {"csv": None, "events": None, "trackers": []}
    try:
        out["csv"] = write_csv(save_dir, entries)
    except OSError as e:
        LOGGER.warning("yolo_prune_plugin: could not write %s in %s: %s", CSV_NAME, save_dir, e)
    try:
        out["events"] = write_tensorboard(save_dir, entries, history, sweep, images)
    except Exception as e:  # noqa: BLE001 - TensorBoard output is a convenience
        LOGGER.warning("yolo_prune_plugin: could not write TensorBoard events in %s: %s", save_dir, e)
    scalars: dict[str, float] = {}
    for e in entries:
        scalars.update(entry_scalars(e))
    out["trackers"] = send_to_trackers(yolo_loggers, scalars)
    return out
