#!/usr/bin/env python3
"""Retention benchmark (issue 5): one-shot accuracy per method at 30 % / 50 % global Conv2d sparsity.

    python scripts/benchmark_retention.py            # shared yolov5n + coco128 at 640 (needs ../shared)

Prints one table: method x amount -> P, R, mAP50, mAP50-95, retention (mAP50-95 / dense), with YOLOv5's own
per-layer ``prune()`` as the reference row; the wall time of the sweep against the same points evaluated by
separate ``val.run`` calls (YOLOv5's standalone path: load weights, build dataloader, validate); and the time of
pruning itself on a 7 M-parameter model (yolov5s). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from yolo_prune_plugin.adapter import get_backend, load_checkpoint  # noqa: E402
from yolo_prune_plugin.config import PruneConfig  # noqa: E402
from yolo_prune_plugin.evaluation import make_settings, write_absolute_data_yaml  # noqa: E402
from yolo_prune_plugin.pruning import prune_model  # noqa: E402
from yolo_prune_plugin.sweep import sweep_model  # noqa: E402


def time_separate_val(backend, src_ckpt: dict, points, data: Path, imgsz: int, batch: int, device: str,
                      workers: int, tmp: Path, calibration=None) -> float:
    """The same points the YOLOv5 way: prune, save, then one standalone val.run per point."""
    total = 0.0
    for method, amount in points:
        model = copy.deepcopy(src_ckpt["model"]).float()
        prune_model(model, amount, method, calibration=calibration, log=False)
        f = tmp / f"{method}_{amount}.pt"
        torch.save({**src_ckpt, "model": model.half(), "ema": None}, f)
        t0 = time.perf_counter()
        backend.val.run(data=str(data), weights=str(f), imgsz=imgsz, batch_size=batch, device=device,
                        workers=workers, iou_thres=0.6, project=str(tmp / "val"), name="p", exist_ok=True, plots=False)
        total += time.perf_counter() - t0
    return total


def pruning_time_7m(backend, repeats: int = 3) -> dict:
    model = backend.yolo.Model(str(Path(backend.root) / "models" / "yolov5s.yaml"), nc=80)
    params = sum(p.numel() for p in model.parameters())
    out = {"parameters": params}
    for method in ("global", "lamp", "layerwise"):
        times = []
        for _ in range(repeats):
            m = copy.deepcopy(model)
            times.append(prune_model(m, 0.5, method, log=False).seconds)
        out[method] = min(times)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--data", default="coco128")
    ap.add_argument("--img", type=int, default=640)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--methods", default="global,lamp,obs,layerwise")
    ap.add_argument("--amounts", default="0.3,0.5")
    ap.add_argument("--skip-separate", action="store_true", help="skip the separate val.run timing")
    args = ap.parse_args()

    shared = Path(args.shared)
    weights = shared / "weights" / "yolov5n.pt"
    if not weights.is_file():
        print(f"needs {weights} (the shared data folder)", file=sys.stderr)
        return 2
    backend = get_backend()
    methods = [m for m in args.methods.split(",") if m]
    amounts = [float(a) for a in args.amounts.split(",") if a]
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        data = write_absolute_data_yaml(shared / "data" / f"{args.data}.yaml", tmp)
        ckpt = load_checkpoint(weights)
        settings = make_settings(data, args.img, args.batch_size, args.device, False, args.workers, backend)
        t0 = time.perf_counter()
        result = sweep_model(ckpt["model"], settings, amounts, methods, PruneConfig(), backend, echo=print)
        sweep_s = time.perf_counter() - t0
        n = len(result["points"])
        separate_s = None
        if not args.skip_separate:
            calib = None
            if "obs" in methods:
                from yolo_prune_plugin.calibration import load_calibration_images

                calib = load_calibration_images(settings.data, args.img, n=16, batch_size=8, seed=0,
                                                device=settings.device)
            pts = [(r["method"], r["amount"]) for r in result["points"]]
            separate_s = time_separate_val(backend, ckpt, pts, data, args.img, args.batch_size, args.device,
                                           args.workers, tmp, calib)
            # the sweep's dense baseline is one more val pass: compare like with like (N points each)
            separate_s += separate_s / n
        prune_t = pruning_time_7m(backend)

    dense = result["dense"]
    dev = str(settings.device)
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and dev != "cpu" else None
    print(f"\nRetention benchmark, {date.today()}, yolov5n on {args.data} at {args.img}, device {gpu or 'CPU ' + cpu}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| method | sparsity | P | R | mAP50 | mAP50-95 | retention |")
    print(f"|---|---|---|---|---|---|---|")
    print(f"| dense | 0 % | {dense['P']:.3f} | {dense['R']:.3f} | {dense['mAP50']:.3f} | {dense['mAP50-95']:.3f} | 1.000 |")
    label = {"layerwise": "YOLOv5 prune() (layerwise, reference)", "global": "global L1", "lamp": "LAMP",
             "obs": "obs (data-aware reconstruction)"}
    for r in sorted(result["points"], key=lambda r: (r["amount"], methods.index(r["method"]))):
        print(f"| {label.get(r['method'], r['method'])} | {100 * r['amount']:.0f} % | {r['P']:.3f} | {r['R']:.3f} | "
              f"{r['mAP50']:.3f} | {r['mAP50-95']:.3f} | {r['retention']:.3f} |")
    print(f"\nSweep of {n} points + dense baseline: {sweep_s:.1f} s (prune + calibration + val)")
    if separate_s is not None:
        print(f"Same {n} points + baseline as separate val.run calls (val only): {separate_s:.1f} s "
              f"-> ratio {sweep_s / separate_s:.2f}")
    print(f"Pruning time, yolov5s ({prune_t['parameters'] / 1e6:.1f} M params) at 50 %: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in prune_t.items() if k != "parameters"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
