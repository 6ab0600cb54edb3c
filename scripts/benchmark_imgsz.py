#!/usr/bin/env python
"""Benchmark (issue 25): the budget search over (input size, amount) against resizing alone, on held-out images.

    flock /tmp/bench.lock python scripts/benchmark_imgsz.py --out /tmp/bench_imgsz [--speedups 1.5,2.0]

Corn-pest yolov5n at 416 px: calibration on its ``train`` split, the search on its ``valid`` split (``search_images``
of them, seeded), every accuracy figure below on its ``test`` split, which neither the search nor the checkpoint's
training ever saw. For each speed-up limit:

* ``imgsz: auto`` (416 down to 256) with ``structure: channel`` defaults: the chosen point, its search cost;
* the same limit without ``imgsz`` (today's search, channel only): its cost and its result;
* on ``test``: the dense model at every size of the search (resize-only) and the chosen file at its deploy size,
  all timed side by side in one ONNX Runtime CPU run (1 thread, batch 1) against the dense model at 416.

Writes ``imgsz.json`` and ``imgsz.md`` (the table for docs/benchmarks.md) into ``--out``. Not a test: timings
depend on the machine, whose load is printed with the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" if (ROOT.parent / "shared").is_dir() else Path("/work/shared")
SIZES = (416, 384, 352, 320, 288, 256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--speedups", default="1.5,2.0")
    ap.add_argument("--search-images", type=int, default=120)
    ap.add_argument("--runs", type=int, default=30, help="timed rounds of the held-out latency table")
    args = ap.parse_args()
    speedups = [float(x) for x in args.speedups.split(",")]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(1)
    from yolo_prune_plugin import prune
    from yolo_prune_plugin.backend.evaluation import evaluate_weights, make_settings, write_absolute_data_yaml
    from yolo_prune_plugin.backend.loading import get_backend
    from yolo_prune_plugin.backend.patches import driving_yolov5
    from yolo_prune_plugin.tools.bench import bench_files
    from yolo_prune_plugin.tools.heldout import retarget_data_yaml

    backend = get_backend()
    src = write_absolute_data_yaml(SHARED / "data" / "cornpest.yaml", out / "abs")
    search_yaml = retarget_data_yaml(src, out, evaluation="val")  # train: calibration, val: the search
    test_yaml = retarget_data_yaml(src, out, evaluation="test")  # held out from everything
    dense = out / "dense.pt"
    shutil.copyfile(SHARED / "weights" / "yolov5n-cornpest.pt", dense)
    load = os.getloadavg()
    rows, test_map = [], {}
    with driving_yolov5(backend):
        for s in SIZES:  # resize-only on the held-out split
            settings = make_settings(test_yaml, s, 32, "cpu", workers=0, backend=backend)
            test_map[s] = evaluate_weights(dense, settings, backend=backend).map
        for x in speedups:
            row = {"min_speedup": x}
            for name, imgsz_opt in (("joint", "auto"), ("channel", None)):
                folder = out / f"{name}_{x}"
                folder.mkdir(exist_ok=True)
                w = folder / "best.pt"
                shutil.copyfile(dense, w)
                target = {"min_speedup": x, "search_images": args.search_images, "write_best_effort": True}
                if imgsz_opt:
                    target["imgsz"] = imgsz_opt
                t0 = time.perf_counter()
                [e] = prune(w, search_yaml, imgsz=416, device="cpu", workers=0, structure="channel", target=target)
                seconds = time.perf_counter() - t0
                t = e.target
                deploy = e.deploy_imgsz or 416
                settings = make_settings(test_yaml, deploy, 32, "cpu", workers=0, backend=backend)
                held = evaluate_weights(e.output, settings, backend=backend).map
                row[name] = {"deploy_imgsz": deploy, "amount": t["amount"], "met": t["met"],
                             "search_speedup": t["chosen"]["speedup"], "search_seconds": t["seconds"],
                             "evaluations": t["evaluations"], "wall_seconds": round(seconds, 1),
                             "test_map": held, "test_retention": round(held / test_map[416], 4),
                             "resize_baseline": (t.get("resize_baseline") or {}).get("imgsz"),
                             "versus_resize": t.get("versus_resize"), "output": e.output}
            rows.append(row)
        files = [dense] * len(SIZES) + [Path(r[k]["output"]) for r in rows for k in ("joint", "channel")]
        sizes = list(SIZES) + [r[k]["deploy_imgsz"] for r in rows for k in ("joint", "channel")]
        bench = bench_files(files, imgsz=416, runs=args.runs, warmup=5, threads=1, backends=("onnxruntime",),
                            sizes=sizes)
    speed = [b["onnxruntime_speedup"] for b in bench]
    resize = {s: {"speedup": speed[i], "retention": round(test_map[s] / test_map[416], 4)}
              for i, s in enumerate(SIZES)}
    k = len(SIZES)
    for r in rows:
        for name in ("joint", "channel"):
            r[name]["test_speedup"] = speed[k]
            k += 1
        j = r["joint"]
        fast = [v["retention"] for s, v in resize.items() if v["speedup"] >= j["test_speedup"]]
        j["best_resize_as_fast_test"] = max(fast) if fast else None
    meta = {"date": dt.datetime.now().isoformat(timespec="minutes"), "machine": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "load_before": [round(v, 2) for v in load],
            "load_after": [round(v, 2) for v in os.getloadavg()], "command": " ".join(sys.argv),
            "dense_test_map": test_map[416]}
    (out / "imgsz.json").write_text(json.dumps({"meta": meta, "resize": resize, "rows": rows}, indent=1))
    lines = [f"`{meta['command']}` — {meta['date']}, {meta['cpus']} CPUs, load {meta['load_before']} before, "
             f"{meta['load_after']} after; corn-pest yolov5n, search on 120 `valid` images, all numbers below on "
             f"`test` (117 images, never seen); dense mAP50-95 {test_map[416]:.4f} at 416; ONNX Runtime CPU, "
             "1 thread, batch 1, every model timed in one side-by-side run against the dense model at 416.", "",
             "| resize only | " + " | ".join(str(s) for s in SIZES) + " |", "|---" * (len(SIZES) + 1) + "|",
             "| speed-up | " + " | ".join(f"{resize[s]['speedup']:.2f}×" for s in SIZES) + " |",
             "| retention | " + " | ".join(f"{resize[s]['retention']:.3f}" for s in SIZES) + " |", "",
             "| limit | search | chosen | speed-up (test run) | retention (test) | best resize-only as fast (test) "
             "| search cost |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for name in ("joint", "channel"):
            v = r[name]
            what = ("resize only" if v["amount"] == 0 else f"amount {v['amount']:.3f}") + f" at {v['deploy_imgsz']}"
            best = v.get("best_resize_as_fast_test")
            lines.append(f"| {r['min_speedup']}× | {'imgsz: auto' if name == 'joint' else 'channel only'} | {what}"
                         f"{'' if v['met'] else ' (not met)'} | {v['test_speedup']:.2f}× | "
                         f"{v['test_retention']:.3f} | {'-' if best is None else f'{best:.3f}'} | "
                         f"{v['search_seconds']:.0f} s, "
                         f"{v['evaluations']} points |")
    (out / "imgsz.md").write_text("\n".join(lines) + "\n")
    for cache in (SHARED / "data" / "cornpest").glob("*/labels.cache"):  # YOLOv5's label scan wrote into shared/
        cache.unlink(missing_ok=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
