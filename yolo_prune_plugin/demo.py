"""``yolo-prune demo``: the embedded default job — synthetic data, a small YOLOv5 trained on CPU, pruned."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from .api import run_training, train_opt
from .backend.loading import get_backend
from .config import load_config
from .tools.synthetic import DEMO, make_dataset

LOGGER = logging.getLogger("yolo_prune_plugin")


def run_demo(folder: str | Path = "runs/yolo-prune-demo", amount: Optional[float] = None,
             method: Optional[str] = None, epochs: Optional[int] = None, device: str = "",
             yolov5_dir: Optional[str] = None) -> int:
    """Generate (or reuse) the synthetic dataset in ``folder/data``, train YOLOv5n from scratch on it with the
    pruning hook, and print the before/after table. Each run gets a new ``folder/runs/expN``. Returns an exit code."""
    config = load_config(amount=amount, method=method)  # validated before anything is generated or trained
    if epochs is not None and epochs < 1:
        from .errors import ConfigError

        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    backend = get_backend(yolov5_dir)
    root = Path(folder).expanduser().resolve()
    LOGGER.info("yolo-prune demo: synthetic dataset in %s", root / "data")
    data = make_dataset(root / "data", **DEMO.dataset_kwargs())
    overrides = DEMO.train_overrides(data, project=root / "runs", name="exp", yolov5_root=backend.root)
    overrides["exist_ok"] = False  # a new runs/expN each time: earlier demo runs are kept
    if epochs is not None:
        overrides["epochs"] = epochs
    if device:
        overrides["device"] = device
    opt = train_opt([], backend, **overrides)
    plugin = run_training(opt, config, backend)
    if plugin is None or plugin.error is not None or not plugin.entries:
        return 1
    entry = plugin.entries[0]
    sweep = demo_sweep(entry.checkpoint, data, imgsz=int(overrides["imgsz"]), device=device,
                       out=Path(entry.checkpoint).parent.parent / "sweep", backend=backend)
    budget = demo_budget(entry.checkpoint, data, imgsz=int(overrides["imgsz"]), device=device)
    dense = (entry.metrics_before or {}).get("mAP50")
    LOGGER.info("\nDemo finished: dense mAP50 %s, pruned file %s, report %s, sweep plot %s, budget plot %s",
                f"{dense:.3f}" if dense is not None else "n/a", entry.output, plugin.report_path,
                sweep["outputs"]["png"], budget.get("png", "-"))
    return 0


#: The demo's closing sweep: a few amounts of global magnitude pruning, seconds on CPU at the demo's image size.
DEMO_SWEEP_AMOUNTS = (0.3, 0.5, 0.7)


def demo_sweep(weights: str | Path, data: str | Path, imgsz: int, device: str = "", out: str | Path | None = None,
               amounts: tuple = DEMO_SWEEP_AMOUNTS, backend: Optional[object] = None) -> dict:
    """Sweep the demo's trained model over ``amounts`` (global magnitude), print the table and the plot's path."""
    from .tools.sweep import run_sweep

    result = run_sweep(weights, data, amounts=list(amounts), methods="global", imgsz=imgsz, batch_size=32,
                       device=device or "cpu", workers=0, out=out, backend=backend, echo=LOGGER.info)
    rows = ["amount  sparsity  mAP50   mAP50-95  retention"]
    rows += [f"{p['amount']:>6.2f}  {100 * p['sparsity']:>7.1f}%  {p['mAP50']:.3f}   {p['mAP50-95']:.3f}     "
             f"{p['retention'] if p['retention'] is not None else '-'}" for p in result["points"]]
    LOGGER.info("Sweep of the demo model (global):\n%s\nplot: %s", "\n".join(rows), result["outputs"]["png"])
    return result


#: The demo's closing budget search: the most accurate model at least 1.5x faster in ONNX Runtime, over input size
#: (the dense model at a lower --img, the baseline every user has) and channel amount, kept short (a few probes on
#: half the val images; l1 importance needs no gradients); it ends with the accuracy-speed frontier.
DEMO_TARGET = {"min_speedup": 1.5, "imgsz": "auto", "max_evals": 4, "tolerance": 0.04, "max_amount": 0.6,
               "search_images": 64, "write_best_effort": True}


def demo_budget(weights: str | Path, data: str | Path, imgsz: int, device: str = "",
                target: Optional[dict] = None) -> dict:
    """Prune the demo's model to a speed budget (``DEMO_TARGET``) into ``<run>/budget/``; logs the frontier
    (resize-only, channel and joint points: retention against measured speed-up) and what was chosen; returns
    ``{"png": plot, "entry": report entry}`` (``{}`` when the search failed: the reason is logged)."""
    from .api import prune
    from .errors import BudgetError
    from .tools.budget import frontier_text

    weights = Path(weights)
    folder = weights.parent.parent / "budget"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        entry = prune(weights, data, imgsz=imgsz, batch_size=32, device=device or "cpu", workers=0,
                      report_dir=folder, structure="channel", suffix="_budget", overwrite=True,
                      channel={"importance": "l1"}, target={**DEMO_TARGET, **(target or {})})[0]
    except BudgetError as e:
        LOGGER.info("Budget search of the demo model: %s", e)
        return {}
    t = entry.target
    limit = t["budget"]["min_speedup"]
    met = "" if t["met"] else " (not reached: the closest point is shown)"
    LOGGER.info("Accuracy against speed for the demo model (ONNX Runtime CPU, measured; retention of mAP50-95 on %d "
                "val images; * = on the frontier):\n%s\nAt least %sx faster%s: %s\n  file %s (deploy at --img %s)\n"
                "  plot %s", t["search_images"], frontier_text(t), limit, met,
                t.get("versus_resize") or f"amount {t['amount']:.3f}", entry.output,
                entry.deploy_imgsz or imgsz, t["outputs"]["png"])
    return {"png": t["outputs"]["png"], "entry": entry}
