"""The budget search's files for the run folder: ``budget_<stem>.csv`` (every evaluated point) and
``budget_<stem>.png`` (mAP50-95 against speed-up and size; with ``target.imgsz`` the dense model at each lower
input size drawn as its own line, the baseline every ``--img`` user has)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..utils.files import atomic_write_text
from .budget import METRIC_KEYS
from .sweep import _plt, save_figure


def write_budget_files(section: dict, folder: Path, stem: str) -> dict[str, str]:
    """``budget_<stem>.csv`` (every point) and ``budget_<stem>.png`` in ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = ("imgsz", "amount", *METRIC_KEYS, "drop", "latency_ms", "speedup", "size", "params", "seconds", "meets", "chosen",
            "error")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for p in section["trace"]:
        chosen = p["amount"] == section["amount"] and p.get("imgsz") == section["chosen"].get("imgsz")
        w.writerow({**p, **p["metrics"], "chosen": chosen})
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
    resized = sorted((p for p in pts if p.get("imgsz") is not None and p["amount"] == 0), key=lambda p: -p["imgsz"])
    pruned = [p for p in pts if p not in resized]
    for ax, (key, label, dense_x, limit) in zip(axes[0], panels):
        if pruned:
            ax.scatter([p[key] for p in pruned], [p["metrics"]["mAP50-95"] for p in pruned],
                       c=["tab:green" if p["meets"] else "tab:red" for p in pruned], zorder=3,
                       label="one-shot prunes (green: within budget)")
        if resized and key != "size":  # resizing leaves the size alone
            ax.plot([dense_x] + [p[key] for p in resized], [dense] + [p["metrics"]["mAP50-95"] for p in resized],
                    "s--", color="tab:blue", ms=5, lw=1, zorder=2, label="dense, input size lowered (--img)")
        for p in pts:
            at = f"{p['imgsz']}px " if p.get("imgsz") is not None else ""
            text = f"{at}{p['amount']:.2f}" if p["amount"] or not at else at.strip()
            ax.annotate(text, (p[key], p["metrics"]["mAP50-95"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.scatter([dense_x], [dense], marker="s", color="black", zorder=3, label=f"dense {dense:.3f}")
        c = section["chosen"]
        if c.get(key) is not None:
            at = f"--img {c['imgsz']}, " if c.get("imgsz") is not None else ""
            ax.scatter([c[key]], [c["metrics"]["mAP50-95"]], marker="*", s=220, color="gold", edgecolors="black",
                       zorder=4, label=f"chosen: {at}amount {c['amount']:.3f}")
        if b["max_drop"] is not None:
            ax.axhline(dense - b["max_drop"], color="tab:blue", ls="--", lw=1, label=f"max drop {b['max_drop']:.3f}")
        if limit is not None:
            ax.axvline(limit, color="tab:purple", ls="--", lw=1, label=f"limit {limit}")
        ax.set_xlabel(label)
        ax.set_ylabel("mAP50-95 (search images)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, dest, f"Budget search: {section['evaluations']} evaluated points in {section['seconds']:.0f}s")


__all__ = ["write_budget_files", "plot_budget"]
