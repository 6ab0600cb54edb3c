#!/usr/bin/env python
"""Benchmark (issue 25): the budget search over (input size, amount) against resizing alone, on held-out images.

    flock /tmp/bench.lock python scripts/benchmark_imgsz.py --out /tmp/bench_imgsz [--dataset coco128]

Calibration, search and evaluation images are disjoint. Corn-pest yolov5n at 416 px: calibration on ``train``, the
search on ``valid`` (``--search-images`` of them, seeded), every accuracy figure on ``test``, which neither the
search nor the checkpoint's training saw. coco128 with the official yolov5n at 640 px: its images sorted by name,
32 calibrate, 32 are searched, the last 64 evaluate. For each speed-up limit:

* ``imgsz: auto`` with ``structure: channel`` defaults: the chosen point, its search cost;
* the same limit without ``imgsz`` (the channel-only search): its cost and its result;
* on the evaluation images: the dense model at every size of the search (resize-only) and the chosen files at
  their deploy size, all timed side by side in one ONNX Runtime CPU run (1 thread, batch 1) against the dense
  model at the original size.

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


def data_for(name: str, out: Path, seed: int = 0) -> tuple[Path, Path, Path, int, str]:
    """(search data YAML, held-out data YAML, weights, input size, description): calibration, search and
    evaluation images disjoint."""
    import yaml

    from yolo_prune_plugin.backend.data import image_files
    from yolo_prune_plugin.backend.evaluation import write_absolute_data_yaml
    from yolo_prune_plugin.tools.heldout import retarget_data_yaml

    src = write_absolute_data_yaml(SHARED / "data" / f"{name}.yaml", out / "abs")
    if name == "cornpest":
        return (retarget_data_yaml(src, out, evaluation="val"), retarget_data_yaml(src, out, evaluation="test"),
                SHARED / "weights" / "yolov5n-cornpest.pt", 416,
                "corn-pest yolov5n: calibration on `train`, the search on 120 seeded `valid` images, every number "
                "below on `test` (117 images, never seen)")
    d = yaml.safe_load(src.read_text())
    files = image_files(d["val"], Path(d["path"]))
    turn = (64 * seed) % len(files)  # seed 1: the other half is held out (a second split)
    files = files[turn:] + files[:turn]
    parts = {"calibration": files[:32], "search": files[32:64], "evaluation": files[64:]}
    for k, v in parts.items():
        (out / f"{k}.txt").write_text("".join(f"{f}\n" for f in v))
    made = []
    for k in ("search", "evaluation"):
        f = out / f"coco128-{k}.yaml"
        f.write_text(yaml.safe_dump({**d, "train": str(out / "calibration.txt"), "val": str(out / f"{k}.txt")}))
        made.append(f)
    return (made[0], made[1], SHARED / "weights" / "yolov5n.pt", 640,
            "official yolov5n on coco128 (COCO train images: the checkpoint has seen them), sorted by name"
            f"{f' and turned by {turn}' if turn else ''}: the first 32 calibrate, the next 32 are the search's, "
            "every number below on the last 64")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--speedups", default="1.5,2.0")
    ap.add_argument("--dataset", choices=("cornpest", "coco128"), default="cornpest")
    ap.add_argument("--searches", default="joint,channel",
                    help="joint (imgsz: auto), channel (today's allocation), latency (channel.allocation: latency)")
    ap.add_argument("--search-images", type=int, default=120, help="corn-pest: a seeded subset of valid")
    ap.add_argument("--runs", type=int, default=30, help="timed rounds of the held-out latency table")
    ap.add_argument("--round-to", type=int, default=None, help="channel.round_to of every search (default: the "
                    "plugin's)")
    ap.add_argument("--seed", type=int, default=0, help="calibration and search-subset seed; coco128: seed 1 holds "
                    "out the other half of the images")
    ap.add_argument("--after-finetune", type=int, default=0,
                    help="target.after_finetune: fine-tune each chosen point N epochs on the train split")
    args = ap.parse_args()
    speedups = [float(x) for x in args.speedups.split(",")]
    searches = [x for x in args.searches.split(",") if x]
    label = {"joint": "imgsz: auto", "channel": "channel only", "latency": "channel, allocation: latency"}
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(1)
    from yolo_prune_plugin import prune
    from yolo_prune_plugin.backend.evaluation import evaluate_weights, make_settings
    from yolo_prune_plugin.backend.loading import get_backend
    from yolo_prune_plugin.backend.patches import driving_yolov5
    from yolo_prune_plugin.tools.bench import bench_files
    from yolo_prune_plugin.tools.budget import auto_sizes

    backend = get_backend()
    search_yaml, test_yaml, weights, base, what = data_for(args.dataset, out, args.seed)
    sizes = tuple(auto_sizes(base, 32))
    dense = out / "dense.pt"
    shutil.copyfile(weights, dense)
    load = os.getloadavg()
    rows, test_map = [], {}
    with driving_yolov5(backend):
        for s in sizes:  # resize-only on the held-out split
            settings = make_settings(test_yaml, s, 32, "cpu", workers=0, backend=backend)
            test_map[s] = evaluate_weights(dense, settings, backend=backend).map
        for x in speedups:
            row = {"min_speedup": x}
            for name in searches:
                imgsz_opt = "auto" if name == "joint" else None
                folder = out / f"{name}_{x}"
                folder.mkdir(exist_ok=True)
                w = folder / "best.pt"
                shutil.copyfile(dense, w)
                target = {"min_speedup": x, "search_images": args.search_images, "write_best_effort": True,
                          "seed": args.seed}
                if imgsz_opt:
                    target["imgsz"] = imgsz_opt
                if args.after_finetune:
                    target["after_finetune"] = args.after_finetune
                t0 = time.perf_counter()
                channel = {"allocation": "latency"} if name == "latency" else {}
                if args.round_to:
                    channel["round_to"] = args.round_to
                [e] = prune(w, search_yaml, imgsz=base, device="cpu", workers=0, structure="channel", target=target,
                            channel=channel, calibration={"seed": args.seed})
                seconds = time.perf_counter() - t0
                t = e.target
                deploy = e.deploy_imgsz or base
                settings = make_settings(test_yaml, deploy, 32, "cpu", workers=0, backend=backend)
                held = evaluate_weights(e.output, settings, backend=backend).map
                row[name] = {"deploy_imgsz": deploy, "amount": t["amount"], "met": t["met"],
                             "search_speedup": t["chosen"]["speedup"], "search_seconds": t["seconds"],
                             "evaluations": t["evaluations"], "wall_seconds": round(seconds, 1),
                             "test_map": held, "test_retention": round(held / test_map[base], 4),
                             "resize_baseline": (t.get("resize_baseline") or {}).get("imgsz"),
                             "versus_resize": t.get("versus_resize"), "output": e.output,
                             "finetune_seconds": (e.finetune or {}).get("seconds")}
            rows.append(row)
        files = [dense] * len(sizes) + [Path(r[k]["output"]) for r in rows for k in searches]
        timed = list(sizes) + [r[k]["deploy_imgsz"] for r in rows for k in searches]
        bench = bench_files(files, imgsz=base, runs=args.runs, warmup=5, threads=1, backends=("onnxruntime",),
                            sizes=timed)
    speed = [b["onnxruntime_speedup"] for b in bench]
    resize = {s: {"speedup": speed[i], "retention": round(test_map[s] / test_map[base], 4)}
              for i, s in enumerate(sizes)}
    k = len(sizes)
    for r in rows:
        for name in searches:
            r[name]["test_speedup"] = speed[k]
            k += 1
        j = r.get("joint")
        if j is None:
            continue
        fast = [v["retention"] for s, v in resize.items() if v["speedup"] >= j["test_speedup"]]
        j["best_resize_as_fast_test"] = max(fast) if fast else None
    meta = {"date": dt.datetime.now().isoformat(timespec="minutes"), "machine": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "load_before": [round(v, 2) for v in load],
            "load_after": [round(v, 2) for v in os.getloadavg()], "command": " ".join(sys.argv),
            "dense_test_map": test_map[base]}
    (out / "imgsz.json").write_text(json.dumps({"meta": meta, "resize": resize, "rows": rows}, indent=1))
    lines = [f"`{meta['command']}` — {meta['date']}, {meta['cpus']} CPUs, load {meta['load_before']} before, "
             f"{meta['load_after']} after; {what}; dense mAP50-95 {test_map[base]:.4f} at {base}; ONNX Runtime "
             f"CPU, 1 thread, batch 1, every model timed in one side-by-side run against the dense model at {base}.",
             "",
             "| resize only | " + " | ".join(str(s) for s in sizes) + " |", "|---" * (len(sizes) + 1) + "|",
             "| speed-up | " + " | ".join(f"{resize[s]['speedup']:.2f}×" for s in sizes) + " |",
             "| retention | " + " | ".join(f"{resize[s]['retention']:.3f}" for s in sizes) + " |", "",
             "| limit | search | chosen | speed-up (test run) | retention (test) | best resize-only as fast (test) "
             "| search cost |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for name in searches:
            v = r[name]
            what = ("resize only" if v["amount"] == 0 else f"amount {v['amount']:.3f}") + f" at {v['deploy_imgsz']}"
            best = v.get("best_resize_as_fast_test")
            ft = f", then {args.after_finetune} fine-tune epochs" if args.after_finetune else ""
            lines.append(f"| {r['min_speedup']}× | {label[name]}{ft} | {what}"
                         f"{'' if v['met'] else ' (not met)'} | {v['test_speedup']:.2f}× | "
                         f"{v['test_retention']:.3f} | {'-' if best is None else f'{best:.3f}'} | "
                         f"{v['search_seconds']:.0f} s, "
                         f"{v['evaluations']} points |")
    (out / "imgsz.md").write_text("\n".join(lines) + "\n")
    for cache in [*(SHARED / "data").glob("*/*/labels.cache"), *(SHARED / "data").glob("*/labels/*.cache")]:
        cache.unlink(missing_ok=True)  # YOLOv5's label scan wrote into shared/
    print("\n".join(lines))


if __name__ == "__main__":
    main()
