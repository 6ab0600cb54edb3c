#!/usr/bin/env python
"""Benchmark: channels trained in (``channel.regularize``) against the same training without the penalty.

    flock /tmp/bench.lock python scripts/benchmark_regularize.py --epochs 20 --weight 0.05 --from-epoch 5 \\
        --out /tmp/bench_regularize

Defaults: corn-pest (third-party yolov5n, 4 classes) at 416. Each row is a real ``yolo-prune train`` run
(``api.train``: YOLOv5's ``train.main`` with the plugin registered) of ``--epochs`` epochs on the data's ``train``
split (400 images) from the shared checkpoint, with ``structure: channel, amount: --amount`` pruned one-shot at
train end (the plugin's default channel pipeline); ``penalty`` adds ``channel.regularize: {weight, from_epoch}``,
``control`` does not. YOLOv5's per-epoch validation (``best.pt``) uses the first ``--select`` images of the data's
``val`` split; the run's ``best.pt`` (dense) and the pruned file are then both evaluated by the plugin's validation
on the untouched ``test`` split. Retention = pruned / dense of the same run. Rows are appended to
``<out>/benchmark_regularize.json`` as they finish.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_recovery import _split_yamls, common_arguments  # noqa: E402  (one data split, one recipe)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(ap, "runs/benchmark_regularize")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--amount", type=float, default=0.5)
    ap.add_argument("--weight", type=float, default=0.05, help="channel.regularize.weight of the penalty row")
    ap.add_argument("--from-epoch", type=int, default=5, help="channel.regularize.from_epoch of the penalty row")
    ap.add_argument("--max-drop", default="0.02", help="channel.regularize.max_drop of the penalty row (none: a "
                    "fixed lambda; the 'fixed' row always uses none)")
    ap.add_argument("--rows", default="penalty,control", help="comma-separated: penalty, fixed (lambda never adapts), "
                    "control")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from yolo_prune_plugin import api
    from yolo_prune_plugin.backend.evaluation import evaluate_weights, make_settings
    from yolo_prune_plugin.backend.loading import get_backend
    from yolo_prune_plugin.backend.patches import driving_yolov5

    b = get_backend()
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_data, data = _split_yamls(Path(args.data), out, args.eval_split, args.select)
    settings = make_settings(data, args.imgsz, 32, args.device, workers=args.workers, backend=b)
    result: dict = {"args": vars(args), "rows": []}
    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        for kind in [r.strip() for r in args.rows.split(",") if r.strip()]:
            if kind not in ("penalty", "fixed", "control"):
                raise SystemExit(f"--rows: expected penalty, fixed or control, got {kind!r}")
            cfg: dict = {"structure": "channel", "amount": args.amount, "overwrite": True}
            if kind != "control":
                max_drop = None if kind == "fixed" or args.max_drop.lower() == "none" else float(args.max_drop)
                cfg["channel"] = {"regularize": {"weight": args.weight, "from_epoch": args.from_epoch,
                                                 "max_drop": max_drop}}
            name = f"{kind}_s{seed}"
            t0 = time.perf_counter()
            plugin = api.train(prune=cfg, data=str(train_data), weights=str(args.weights), epochs=args.epochs,
                               imgsz=args.imgsz, batch_size=args.batch_size, device=args.device,
                               workers=args.workers, project=str(out), name=name, exist_ok=True, seed=seed,
                               noplots=True, cache="ram")
            seconds = time.perf_counter() - t0
            if plugin is None or plugin.error or not plugin.entries:
                raise SystemExit(f"{name}: the train-end prune failed ({getattr(plugin, 'error', None)})")
            e = plugin.entries[0]
            with driving_yolov5(b):
                dense = evaluate_weights(e.checkpoint, settings, backend=b)
                pruned = evaluate_weights(e.output, settings, backend=b)
            val = _val_curve(out / name / "results.csv")
            row = {"row": kind, "seed": seed, "file": Path(e.checkpoint).name, "val_mAP50-95": val,
                   "residual": (e.channels or {}).get("residual"),
                   "plan": (e.channels or {}).get("plan"), "dense_mAP50-95": dense.map, "pruned_mAP50-95": pruned.map,
                   "dense_mAP50": dense.map50, "pruned_mAP50": pruned.map50,
                   "retention": round(pruned.map / dense.map, 4) if dense.map else None,
                   "params": [(e.channels or {}).get(k) for k in ("params_before", "params_after")],
                   "train_seconds": round(seconds, 1), "history": plugin.history if hasattr(plugin, "history")
                   else None, "config": cfg}
            result["rows"].append(row)
            (out / "benchmark_regularize.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
            print(f"[bench] {name}: dense {dense.map:.4f} -> channel {args.amount:g} one-shot {pruned.map:.4f} "
                  f"(retention {row['retention']}), {seconds:.0f} s", flush=True)
    return 0


def _val_curve(csv: Path) -> list[float]:
    """YOLOv5's per-epoch val mAP50-95 from a run's ``results.csv`` (empty when absent)."""
    if not csv.is_file():
        return []
    lines = [[c.strip() for c in line.split(",")] for line in csv.read_text().splitlines() if line.strip()]
    col = next((i for i, h in enumerate(lines[0]) if h.endswith("mAP_0.5:0.95")), None)
    return [round(float(r[col]), 4) for r in lines[1:]] if col is not None else []


if __name__ == "__main__":
    sys.exit(main())
