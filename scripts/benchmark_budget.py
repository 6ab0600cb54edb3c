#!/usr/bin/env python
"""Benchmark (issue 19): prune to a budget, the search against a reference sweep at 0.05 steps.

    flock /tmp/bench.lock python scripts/benchmark_budget.py --out /tmp/bench_budget [--datasets cornpest,coco128]

For each data set: calibration on its train split, evaluation on held-out images (corn-pest: its ``test`` split at
416 px; coco128: the held-out split of tools/heldout.py at 640 px). Rows:

* ``max_drop`` 0.01 / 0.02, ``method: global`` (magnitude: the reference sweep of obs would not fit the CPU budget);
* ``min_speedup`` 1.25 / 1.5, ``structure: channel`` (Taylor importance + BN recalibration, ONNX Runtime CPU, 1
  thread), the chosen file timed again afterwards by ``yolo-prune bench`` in a fresh process.

Each search is the real ``yolo_prune_plugin.prune(..., target=...)`` (file written, full-val re-check); the
reference sweep uses the same machinery (:class:`~yolo_prune_plugin.tools.budget_run.Prober`) at 0.05, 0.10, ...
and stops once a point is far past the budget (drop > 3x the largest limit, speed-up > the largest limit + 0.2).
The "4-point sweep" cost is the reference's own dense evaluation plus four of its points (mean seconds).
Not a test: numbers depend on the machine (its load is printed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" if (ROOT.parent / "shared").is_dir() else Path("/work/shared")

DROPS, SPEEDUPS = (0.01, 0.02), (1.25, 1.5)


def data_for(name: str, out: Path) -> tuple[Path, Path, int]:
    """(data yaml with held-out val, weights, imgsz)."""
    from yolo_prune_plugin.backend.evaluation import write_absolute_data_yaml
    from yolo_prune_plugin.tools.heldout import retarget_data_yaml, split_data_yaml

    src = write_absolute_data_yaml(SHARED / "data" / f"{name}.yaml", out / "abs")
    if name == "cornpest":
        return retarget_data_yaml(src, out, evaluation="test"), SHARED / "weights" / "yolov5n-cornpest.pt", 416
    return split_data_yaml(src, out, calibration=64, evaluation=64), SHARED / "weights" / "yolov5n.pt", 640


def reference(weights: Path, data: Path, imgsz: int, config, stop) -> dict:
    """Points at 0.05 steps with the search's own prober, until ``stop(point)``."""
    from yolo_prune_plugin import pipeline
    from yolo_prune_plugin.backend.evaluation import make_settings
    from yolo_prune_plugin.backend.loading import get_backend, load_checkpoint
    from yolo_prune_plugin.backend.patches import driving_yolov5
    from yolo_prune_plugin.tools.budget_run import Prober

    backend = get_backend()
    ckpt = load_checkpoint(weights, backend)
    settings = make_settings(data, imgsz, 32, "cpu", False, 0, backend)
    ctx = pipeline.RunContext(backend, settings.device, imgsz, settings)
    cache: dict = {}
    with driving_yolov5(backend):
        t0 = time.perf_counter()
        prober = Prober(weights, pipeline.source_model(ckpt), lambda a: pipeline.prune_stage(
            ckpt, replace(config, amount=a), ctx, cache), config, settings, backend, imgsz)
        dense_s = time.perf_counter() - t0
        points = []
        try:
            for i in range(1, 19):
                p = prober(round(0.05 * i, 2))
                p.drop = None if p.error else round(prober.dense.map - p.metrics["mAP50-95"], 6)
                points.append(p.to_dict())
                print(f"  ref {p.amount:.2f}: {p.metrics.get('mAP50-95')} drop {p.drop} speed-up {p.speedup} "
                      f"({p.seconds:.1f}s, load {os.getloadavg()[0]:.1f})", flush=True)
                if p.error or stop(p):
                    break
        finally:
            prober.close()
    return {"dense": prober.dense.to_dict(), "dense_seconds": round(dense_s, 1), "points": points}


def run_search(weights: Path, data: Path, imgsz: int, out: Path, suffix: str, **overrides) -> dict:
    from yolo_prune_plugin import prune

    entry = prune(weights, data, imgsz=imgsz, batch_size=32, device="cpu", workers=0, report_dir=out / suffix,
                  suffix=suffix, overwrite=True, **overrides)[0]
    return entry.to_dict()


def fresh_bench(dense: Path, pruned: str, imgsz: int) -> float:
    """ONNX Runtime speed-up of ``pruned`` over ``dense`` measured by ``yolo-prune bench`` in a new process."""
    js = Path(pruned).with_suffix(".bench.json")
    subprocess.run([sys.executable, "-m", "yolo_prune_plugin.cli", "bench", "--weights", str(dense), pruned,
                    "--img", str(imgsz), "--threads", "1", "--backends", "onnxruntime", "--runs", "50",
                    "--json", str(js)], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(js.read_text())["bench"][1]["onnxruntime_speedup"]


def best_reference(points: list[dict], key: str, limit: float) -> float | None:
    """The reference's answer: the largest amount within a drop limit, the smallest reaching a speed-up."""
    if key == "drop":
        ok = [p["amount"] for p in points if not p.get("error") and p["drop"] <= limit]
        return max(ok) if ok else None
    ok = [p["amount"] for p in points if not p.get("error") and (p["speedup"] or 0) >= limit]
    return min(ok) if ok else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/bench_budget")
    ap.add_argument("--datasets", default="cornpest")
    args = ap.parse_args()
    from yolo_prune_plugin.config import config_from_dict

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
               "cpus": os.cpu_count(), "load_start": os.getloadavg(), "rows": []}
    for name in args.datasets.split(","):
        d = out / name
        d.mkdir(exist_ok=True)
        data, src, imgsz = data_for(name, d)
        weights = d / "best.pt"
        shutil.copyfile(src, weights)
        for structure, key, limits in (("unstructured", "drop", DROPS), ("channel", "speedup", SPEEDUPS)):
            if structure == "unstructured":
                cfg = config_from_dict({"method": "global", "target": {"max_drop": max(limits)}})
                ref = reference(weights, data, imgsz, cfg, lambda p: p.drop > 3 * max(limits))
            else:
                cfg = config_from_dict({"structure": "channel", "target": {"min_speedup": max(limits)}})
                ref = reference(weights, data, imgsz, cfg, lambda p: (p.speedup or 0) > max(limits) + 0.2)
            pts = [p for p in ref["points"] if not p.get("error")]
            sweep4 = ref["dense_seconds"] + 4 * sum(p["seconds"] for p in pts) / len(pts)
            for limit in limits:
                suffix = f"_{key}{limit}"
                over = ({"method": "global", "target": {"max_drop": limit}} if key == "drop" else
                        {"structure": "channel", "target": {"min_speedup": limit}})
                t0 = time.perf_counter()
                entry = run_search(weights, data, imgsz, d, suffix, **over)
                wall = time.perf_counter() - t0
                t = entry["target"]
                row = {"dataset": name, "imgsz": imgsz, "structure": structure, "limit": f"{key} {limit}",
                       "chosen": t["amount"], "reference": best_reference(ref["points"], key, limit),
                       "evaluations": t["evaluations"], "search_s": t["seconds"], "wall_s": round(wall, 1),
                       "sweep4_s": round(sweep4, 1), "final": t["final"], "chosen_point": t["chosen"],
                       "load": os.getloadavg()[0]}
                if key == "speedup":
                    row["fresh_bench_speedup"] = fresh_bench(weights, entry["output"], imgsz)
                print(json.dumps({k: v for k, v in row.items() if k != "chosen_point"}), flush=True)
                results["rows"].append(row)
            results[f"{name}_{structure}_reference"] = ref
            (out / "results.json").write_text(json.dumps(results, indent=1))
    results["load_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict) -> None:
    print(f"\n{results['date']} {results['machine']} {results['cpus']} CPUs, load {results['load_start']}")
    print("| data | limit | chosen | reference best | |diff| | evals | search s | 4-pt sweep s | ratio | full-val |")
    for r in results["rows"]:
        f = r["final"] or {}
        extra = (f"drop {f.get('drop'):+.4f} {'ok' if f.get('meets') else 'NOT met'}" if r["limit"].startswith("drop")
                 else f"{r['chosen_point']['speedup']}x in search, {r.get('fresh_bench_speedup')}x fresh bench")
        diff = abs(r["chosen"] - r["reference"]) if r["reference"] is not None else None
        print(f"| {r['dataset']} {r['imgsz']} | {r['limit']} | {r['chosen']:.3f} | {r['reference']} | "
              f"{'-' if diff is None else f'{diff:.3f}'} | {r['evaluations']} | {r['search_s']} | {r['sweep4_s']} | "
              f"{r['search_s'] / r['sweep4_s']:.2f} | {extra} |")


if __name__ == "__main__":
    main()
