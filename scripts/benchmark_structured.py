#!/usr/bin/env python
"""Benchmark (issue 10): channel pruning vs unstructured pruning of yolov5n: size, speed and accuracy.

    python scripts/benchmark_structured.py --phase oneshot   --out /tmp/bench_structured   # minutes
    python scripts/benchmark_structured.py --phase explore   --out /tmp/bench_structured   # one-shot grid
    python scripts/benchmark_structured.py --phase finetune  --out /tmp/bench_structured   # long on CPU
    python scripts/benchmark_structured.py --phase table     --out /tmp/bench_structured   # print all rows
    python scripts/benchmark_structured.py --phase issue17   --out /tmp/bench_issue17      # one-shot rows, 3 splits

Phase ``issue17`` (issue 17: one-shot channel pruning that keeps the model usable) runs the pipeline's own channel
stage (``pipeline.prune_stage``) row by row: today's default -> + ``round_share`` -> + ``allocation: sensitivity``
-> + ``reconstruct`` -> + ``compensate``, at ``--amounts``, on three held-out splits: coco128 A (sorted files,
first 64 calibrate, last 64 evaluate; tools/heldout.split_data_yaml), coco128 B (the same two halves swapped) at
640, and corn-pest (train calibrates, test evaluates) at 416 with its own weights. ``--splits``/``--rows`` cut it.

Data: the shared coco128 split in two disjoint parts: the first ``--calib`` images (sorted by name) are the
calibration/"train" split (BN recalibration, Taylor gradients), the rest is the held-out split every one-shot
row is scored on. The fine-tune rows train on all of coco128 (train == val, as scripts/benchmark_recovery.py:
they measure fitting) with that script's best settings (10 epochs, lr_scale 1.0, no warmup, imgsz 320, batch
16); the dense model is fine-tuned the same way as the reference; all rows are validated at ``--imgsz``.
Latency: ONNX Runtime CPU, batch 1, ``--imgsz``, one process, side by side (:func:`bench.bench_files`).
Not a test: numbers depend on the machine (its load is printed).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("YOLO_PRUNE_SHARED", ROOT.parent / "shared"))


def split_data(out: Path, n_calib: int) -> tuple[Path, Path]:
    """(held-out yaml: train = first n_calib images, val = the rest; full coco128 yaml with absolute path)."""
    import yaml

    from yolo_prune_plugin.backend.evaluation import write_absolute_data_yaml

    full = write_absolute_data_yaml(SHARED / "data" / "coco128.yaml", out)
    d = yaml.safe_load(full.read_text())
    images = sorted((Path(d["path"]) / d["train"]).glob("*.jpg"))
    (out / "calib.txt").write_text("\n".join(map(str, images[:n_calib])) + "\n")
    (out / "heldout.txt").write_text("\n".join(map(str, images[n_calib:])) + "\n")
    h = dict(d, train=str(out / "calib.txt"), val=str(out / "heldout.txt"))
    held = out / "coco128_heldout.yaml"
    held.write_text(yaml.safe_dump(h, sort_keys=False))
    return held, full


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_row(path: Path, key: str, row: dict) -> None:
    rows = load_json(path)
    rows[key] = row
    path.write_text(json.dumps(rows, indent=1) + "\n")


class Ctx:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from yolo_prune_plugin.backend.loading import get_backend, load_checkpoint
        from yolo_prune_plugin.backend.evaluation import NMSTimeoutCounter

        self.args = args
        self.b = get_backend()
        self.out = Path(args.out).expanduser().resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.held, self.full = split_data(self.out, args.calib)
        self.weights = Path(args.weights).resolve()
        self.ckpt = load_checkpoint(self.weights, self.b)
        self.nms = NMSTimeoutCounter()
        logging.getLogger("yolov5").addHandler(self.nms)
        self._calib = None
        self._calib_lab = None
        self.torch = torch

    def dense(self):
        return copy.deepcopy(self.ckpt.get("ema") or self.ckpt["model"]).float().eval()

    def calib_images(self):
        if self._calib is None:
            from yolo_prune_plugin.prune.calibration import load_calibration_images

            self._calib = load_calibration_images(self.held, self.args.imgsz, n=self.args.calib)
        return self._calib

    def calib_labelled(self, n: int = 16):
        if self._calib_lab is None:
            from yolo_prune_plugin.prune.calibration import load_calibration_batch

            self._calib_lab = load_calibration_batch(self.held, self.args.imgsz, n=n)
        return self._calib_lab

    def save(self, model, name: str) -> Path:
        from yolo_prune_plugin.pipeline import _stripped

        path = self.out / f"{name}.pt"
        self.torch.save(_stripped(self.ckpt, copy.deepcopy(model).eval(), self.torch.float16), path)
        return path

    def make(self, kind: str, amount: float, recal: bool, importance: str = "l1", round_to: int = 8,
             max_layer_ratio: float = 0.75, tag: str = "", cost_aware: float = 0.0) -> tuple[Path, dict]:
        from yolo_prune_plugin.prune.bn_recalibration import recalibrate_bn

        m = self.dense()
        info: dict = {}
        if kind == "unstructured":
            from yolo_prune_plugin.prune.unstructured import prune_model

            r = prune_model(m, amount, "global")
            info["sparsity"] = round(r.after.sparsity, 4)
        elif kind == "channel":
            from yolo_prune_plugin.prune.channel import channel_prune

            cal = self.calib_labelled() if importance == "taylor" else None
            r = channel_prune(m, amount, importance=importance, round_to=round_to, max_layer_ratio=max_layer_ratio,
                              calibration=cal, imgsz=self.args.imgsz, cost_aware=cost_aware)
            info.update(r.to_dict(per_layer=False))
        if recal == "recon":  # layer-wise least-squares reconstruction against the dense model (evaluation size)
            from yolo_prune_plugin.prune.reconstruction import reconstruct_layers

            info["reconstruction"] = reconstruct_layers(m, self.dense(), self.calib_images(), kept=r.kept)
        elif recal:
            info["bn_recal"] = recalibrate_bn(m, self.calib_images(), batch_size=8)
        name = tag or f"{kind}{int(round(amount * 100))}{'_recal' if recal else ''}"
        return self.save(m, name), info

    def evaluate(self, path: Path, data: Path) -> dict:
        from yolo_prune_plugin.backend.evaluation import evaluate_weights, make_settings

        s = make_settings(data, self.args.imgsz, self.args.val_batch, "cpu", workers=self.args.workers, backend=self.b)
        n0 = self.nms.count
        m = evaluate_weights(path, s, backend=self.b).to_dict()
        m["nms_timeouts"] = self.nms.count - n0
        return m


def phase_oneshot(c: Ctx) -> None:
    from yolo_prune_plugin.tools.bench import bench_files

    res = c.out / "oneshot.json"
    files = {"dense": c.save(c.dense(), "dense")}
    infos = {"dense": {}}
    for kind, a in (("unstructured", 0.5), ("channel", 0.3), ("channel", 0.5)):
        for recal in (False, True):
            p, info = c.make(kind, a, recal)
            files[p.stem], infos[p.stem] = p, info
    bench = {r["file"]: r for r in bench_files([files["dense"], files["unstructured50"], files["channel30"],
                                                files["channel50"]], imgsz=c.args.imgsz, batch=1,
                                               threads=c.args.threads, runs=c.args.runs,
                                               backends=("onnxruntime",))}
    for name, p in files.items():
        row = {**infos[name], **c.evaluate(p, c.held)}
        base = name.replace("_recal", "")
        row["bench"] = bench.get(str(files[base]))
        save_row(res, name, row)
        print(f"[oneshot] {name}: {row}", flush=True)


def phase_explore(c: Ctx) -> None:
    res = c.out / "explore.json"
    done = load_json(res)
    if "dense" not in done:
        save_row(res, "dense", c.evaluate(c.save(c.dense(), "dense"), c.held))
    grid = [("l1", 8, 0.75, True), ("l1", 8, 0.75, False), ("l1", 1, 0.75, True), ("taylor", 8, 0.75, True),
            ("taylor", 1, 0.75, True), ("l1", 8, 0.5, True), ("bn", 8, 0.75, True)]
    grid = [g + (0.0,) for g in grid]
    if c.args.grid:  # IMPORTANCE:ROUND_TO:MAX_LAYER_RATIO:recal|raw[:COST_AWARE]
        grid = [(i, int(r), float(m), {"recal": True, "raw": False}.get(rc, rc), float(ca[0]) if ca else 0.0)
                for i, r, m, rc, *ca in (g.split(":") for g in c.args.grid)]
    for amount in c.args.explore_amounts:
        for imp, rt, mlr, recal, ca in grid:
            key = f"{amount}_{imp}_rt{rt}_mlr{mlr}_{recal if isinstance(recal, str) else 'recal' if recal else 'raw'}"
            key += f"_cost{ca}" if ca else ""
            if key in load_json(res):
                continue
            p, info = c.make("channel", amount, recal, imp, rt, mlr, tag="explore", cost_aware=ca)
            row = {**info, **c.evaluate(p, c.held)}
            save_row(res, key, row)
            print(f"[explore] {key}: mAP50-95 {row['mAP50-95']} achieved {row.get('achieved')}", flush=True)


def phase_finetune(c: Ctx) -> None:
    from yolo_prune_plugin.backend.training_loop import keep_checkpoint_architecture
    from yolo_prune_plugin.api import train_opt
    from yolo_prune_plugin.training.finetune import finetune_checkpoint
    from yolo_prune_plugin.prune.channel import channel_counts

    a = c.args
    res = c.out / "finetune.json"
    base = train_opt([], c.b, data=str(c.full), imgsz=a.ft_imgsz, batch_size=a.batch_size, device="cpu",
                     workers=a.workers, noplots=True, project=str(c.out / "ft"))
    jobs = [(f"channel50_{a.ft_importance}", "channel", 0.5), ("dense", "dense", 0.0),
            (f"channel30_{a.ft_importance}", "channel", 0.3), ("unstructured50", "unstructured", 0.5)][: 4 if a.ft_only else a.ft_jobs]
    for name, kind, amount in jobs:
        if name in load_json(res) or (a.ft_only and name not in a.ft_only):
            continue
        if kind == "dense":
            src = c.save(c.dense(), "dense")
        else:
            src, _ = c.make(kind, amount, True, importance=a.ft_importance if kind == "channel" else "l1",
                            tag=f"{name}_ftstart")
        t0 = time.perf_counter()
        common = dict(lr_scale=a.lr_scale, warmup=False, project=c.out / "ft", name=name, backend=c.b)
        if kind == "channel":
            with keep_checkpoint_architecture(c.b, src) as pruned:
                before = channel_counts(pruned)
                ft = finetune_checkpoint(src, base, a.epochs, masks=None, **common)
            from yolo_prune_plugin.backend.loading import load_checkpoint

            after = channel_counts(load_checkpoint(ft.best, c.b)["model"])
            assert after == before, "fine-tune changed the channel counts"
        else:
            ft = finetune_checkpoint(src, base, a.epochs, masks="zeros" if kind == "unstructured" else None,
                                     **common)
        row = {"file": str(ft.best), "train_s": round(time.perf_counter() - t0, 1), "epochs": a.epochs,
               "history": ft.history, **c.evaluate(ft.best, c.full)}
        save_row(res, name, row)
        print(f"[finetune] {name}: {row['mAP50-95']} ({row['train_s']} s)", flush=True)


def phase_table(c: Ctx) -> None:
    one, ft, ex = (load_json(c.out / f) for f in ("oneshot.json", "finetune.json", "explore.json"))
    print(f"yolov5n, coco128 held-out ({128 - c.args.calib} imgs) @ {c.args.imgsz}, CPU; load {os.getloadavg()}")
    d = one.get("dense", {})
    h = (f"{'row':<22}{'params':>9}{'GFLOPs':>8}{'.pt B':>10}{'.onnx B':>10}{'ORT ms':>8}{'x':>6}"
         f"{'P':>7}{'R':>7}{'mAP50':>7}{'mAP':>7}{'ret':>7}")
    print(h)
    for name, r in one.items():
        bnc = r.get("bench") or {}
        ret = r["mAP50-95"] / d["mAP50-95"] if d.get("mAP50-95") else float("nan")
        print(f"{name:<22}{bnc.get('params', 0):>9}{bnc.get('gflops') or 0:>8.2f}{bnc.get('pt_bytes', 0):>10}"
              f"{bnc.get('onnx_bytes') or 0:>10}{bnc.get('onnxruntime_median_ms') or 0:>8.1f}"
              f"{bnc.get('onnxruntime_speedup') or 0:>6.2f}{r['P']:>7.3f}{r['R']:>7.3f}{r['mAP50']:>7.3f}"
              f"{r['mAP50-95']:>7.3f}{ret:>7.3f}")
    if ft:
        dft = ft.get("dense", {}).get("mAP50-95")
        print(f"fine-tuned ({c.args.epochs} ep, imgsz {c.args.ft_imgsz}, lr_scale {c.args.lr_scale}, no warmup) on "
              "all coco128, validated on all coco128 (fitting):")
        for name, r in ft.items():
            ret = r["mAP50-95"] / dft if dft else float("nan")
            print(f"  {name:<20} P {r['P']:.3f} R {r['R']:.3f} mAP50 {r['mAP50']:.3f} mAP50-95 {r['mAP50-95']:.3f} "
                  f"retention {ret:.3f} train {r['train_s']} s nms_timeouts {r.get('nms_timeouts')}")
    if ex:
        dm = ex.get("dense", {}).get("mAP50-95")
        print("one-shot exploration (held-out):")
        for k, r in ex.items():
            if k != "dense":
                print(f"  {k:<34} achieved {r.get('achieved')} mAP50 {r['mAP50']:.3f} mAP50-95 {r['mAP50-95']:.3f} "
                      f"retention {r['mAP50-95'] / dm if dm else float('nan'):.3f}")


ISSUE17_ROWS = {  # name -> channel options (cumulative); every row uses 32 calibration images, seed --seed
    "default_before": {"round_share": 1.0, "allocation": "global", "reconstruct": False, "compensate": False},
    "round_share": {"allocation": "global", "reconstruct": False, "compensate": False},
    "sensitivity": {"allocation": "sensitivity", "reconstruct": False, "compensate": False},
    "reconstruct": {"allocation": "sensitivity", "reconstruct": True, "compensate": False},
    "compensate": {"allocation": "sensitivity", "reconstruct": True, "compensate": True},
    "global_compensate": {"allocation": "global", "reconstruct": True, "compensate": True},  # allocation off again
    "default_now": {},  # today's defaults: global allocation, round_share 0.125, reconstruction (data given)
    "sensitivity_now": {"allocation": "sensitivity"},  # today's defaults with sensitivity allocation
    "obs": {"importance": "obs"},  # today's defaults with the structured-OBS choice of channels
    "cost_aware_0.05": {"cost_aware": 0.05},  # today's defaults, FLOP-aware ranking (speed)
    "cost_aware_0.1": {"cost_aware": 0.1},
    "cost_aware_0.2": {"cost_aware": 0.2},
}


def issue17_splits(out: Path) -> dict:
    """name -> (held-out data yaml, weights, imgsz)."""
    import yaml

    from yolo_prune_plugin.tools.heldout import retarget_data_yaml, split_data_yaml

    a = split_data_yaml(SHARED / "data" / "coco128.yaml", out / "coco128A", calibration=64, evaluation=64)
    d = yaml.safe_load(a.read_text())
    b = out / "coco128B" / "coco128-heldout-swapped.yaml"
    b.parent.mkdir(parents=True, exist_ok=True)
    b.write_text(yaml.safe_dump({**d, "train": d["val"], "val": d["train"]}, sort_keys=False))
    corn = retarget_data_yaml(SHARED / "data" / "cornpest.yaml", out / "cornpest", evaluation="test")
    w = SHARED / "weights"
    return {"coco128A": (a, w / "yolov5n.pt", 640), "coco128B": (b, w / "yolov5n.pt", 640),
            "cornpest": (corn, w / "yolov5n-cornpest.pt", 416)}


def phase_issue17(args: argparse.Namespace) -> None:
    import torch

    from yolo_prune_plugin import pipeline
    from yolo_prune_plugin.backend.evaluation import evaluate_weights, make_settings
    from yolo_prune_plugin.backend.loading import get_backend, load_checkpoint
    from yolo_prune_plugin.config import config_from_dict

    b = get_backend()
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    res = out / "issue17.json"
    splits = issue17_splits(out)
    for split in args.splits or splits:
        data, weights, imgsz = splits[split]
        s = make_settings(data, imgsz, args.val_batch, "cpu", workers=args.workers, backend=b)
        ckpt = load_checkpoint(weights, b)
        key = f"{split}_dense"
        if key not in load_json(res):
            save_row(res, key, evaluate_weights(weights, s, backend=b).to_dict())
        for amount in args.amounts:
            for row, ch in ISSUE17_ROWS.items():
                key = f"{split}_{int(amount * 100)}_{row}_s{args.seed}"
                if key in load_json(res) or (args.rows and row not in args.rows):
                    continue
                cfg = config_from_dict({"structure": "channel", "amount": amount, "channel": ch,
                                        "calibration": {"images": 32, "seed": args.seed}})
                ctx = pipeline.RunContext(b, torch.device("cpu"), imgsz, s)
                t0 = time.perf_counter()
                model, done = pipeline.prune_stage(ckpt, cfg, ctx)
                secs = time.perf_counter() - t0
                path = out / f"{key}.pt"
                torch.save(pipeline._stripped(ckpt, model, torch.float16), path)
                m = evaluate_weights(path, s, backend=b).to_dict()
                ch_info = done["channels"]
                row_d = {**m, "seconds": round(secs, 1), "achieved": ch_info["achieved"],
                         "gflops_after": ch_info["gflops_after"], "gflops_before": ch_info["gflops_before"],
                         "channel_s": ch_info["seconds"], "sensitivity_s": ch_info.get("sensitivity_seconds"),
                         "reconstruction_s": (done.get("reconstruction") or {}).get("seconds"),
                         "load": os.getloadavg()[0]}
                save_row(res, key, row_d)
                dense = load_json(res)[f"{split}_dense"]["mAP50-95"]
                print(f"[issue17] {key}: mAP50-95 {m['mAP50-95']:.4f} retention {m['mAP50-95'] / dense:.3f} "
                      f"({secs:.0f} s prune, load {os.getloadavg()[0]:.1f})", flush=True)
                if args.keep:
                    path.rename(out / f"{key}.kept.pt")  # for `yolo-prune bench` (speed of the same files)
                else:
                    path.unlink()


def issue17_table(args: argparse.Namespace) -> None:
    """Every row, then per (split, amount, row) the mean retention over the calibration seeds measured."""
    rows = load_json(Path(args.out).expanduser().resolve() / "issue17.json")
    print("| split | amount | row | achieved | GFLOPs | mAP50-95 | retention | prune s |\n|---|---|---|---|---|---|---|---|")
    groups: dict = {}
    for k, r in rows.items():
        if k.endswith("_dense"):
            continue
        split, amount, *row = k.split("_")
        dense = rows[f"{split}_dense"]["mAP50-95"]
        print(f"| {split} | {amount} % | {'_'.join(row)} | {r['achieved']:.3f} | {r['gflops_after']} | "
              f"{r['mAP50-95']:.4f} | {r['mAP50-95'] / dense:.3f} | {r['seconds']} |")
        name, seed = "_".join(row).rsplit("_s", 1) if "_s" in "_".join(row) else ("_".join(row), "0")
        groups.setdefault((split, amount, name), {})[seed] = r["mAP50-95"] / dense
    print("\n| split | amount | row | seeds | mean retention | min | max |\n|---|---|---|---|---|---|---|")
    for (split, amount, name), ret in groups.items():
        v = list(ret.values())
        print(f"| {split} | {amount} % | {name} | {','.join(sorted(ret))} | {sum(v) / len(v):.3f} | {min(v):.3f} | "
              f"{max(v):.3f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", choices=("oneshot", "explore", "finetune", "table", "issue17", "issue17-table"),
                    required=True)
    ap.add_argument("--weights", default=str(SHARED / "weights" / "yolov5n.pt"))
    ap.add_argument("--out", default="/tmp/bench_structured")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--calib", type=int, default=32, help="coco128 images used for calibration (rest held out)")
    ap.add_argument("--val-batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch / ORT threads")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--ft-imgsz", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr-scale", type=float, default=1.0)
    ap.add_argument("--ft-importance", default="taylor", help="importance of the channel-pruned fine-tune starts")
    ap.add_argument("--ft-only", nargs="+", default=None, help="run only these fine-tune jobs (names)")
    ap.add_argument("--ft-jobs", type=int, default=3, help="channel50, dense, channel30, unstructured50: first N")
    ap.add_argument("--explore-amounts", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--grid", nargs="+", default=None, help="explore points IMPORTANCE:ROUND_TO:MAX_RATIO:recal|raw[:COST_AWARE]")
    ap.add_argument("--amounts", type=float, nargs="+", default=[0.3, 0.5], help="issue17: amounts")
    ap.add_argument("--splits", nargs="+", default=None, help="issue17: coco128A coco128B cornpest (default all)")
    ap.add_argument("--rows", nargs="+", default=None, help=f"issue17: rows of {', '.join(ISSUE17_ROWS)}")
    ap.add_argument("--seed", type=int, default=0, help="issue17: calibration draw")
    ap.add_argument("--keep", action="store_true", help="issue17: keep each pruned file as <out>/<row>.kept.pt")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.phase.startswith("issue17"):
        (phase_issue17 if args.phase == "issue17" else issue17_table)(args)
        return 0
    c = Ctx(args)
    {"oneshot": phase_oneshot, "explore": phase_explore, "finetune": phase_finetune, "table": phase_table}[args.phase](c)
    return 0


if __name__ == "__main__":
    sys.exit(main())
