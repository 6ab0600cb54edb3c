#!/usr/bin/env python3
"""Retention benchmark (issue 5): one-shot accuracy per method at 30 % / 50 % global Conv2d sparsity.

    python scripts/benchmark_retention.py            # shared yolov5n + coco128 at 640 (needs ../shared)
    python scripts/benchmark_retention.py --split --contrib --costs   # held-out: coco128 split + corn-pest test

``--split`` (issue 11) scores only images the pruner never saw: coco128's 128 images sorted by file name,
the first 64 are the calibration pool (``train:``) and the last 64 the evaluation set (``val:``), written as
list files + an absolute data YAML in a temporary folder; corn-pest (yolov5n-cornpest.pt, 416) calibrates on
``train`` and is evaluated on ``test``. Methods at 30/50/70 %, the default's spread over calibration seeds,
what each change contributed (``--contrib``) and the cost ratios (``--costs``).

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

from yolo_prune_plugin.backend.patches import driving_yolov5  # noqa: E402
from yolo_prune_plugin.backend.loading import get_backend, load_checkpoint  # noqa: E402
from yolo_prune_plugin.config import CalibrationOptions, PruneConfig  # noqa: E402
from yolo_prune_plugin.backend.evaluation import make_dataloader, make_settings, write_absolute_data_yaml  # noqa: E402
from yolo_prune_plugin.prune.unstructured import prune_model  # noqa: E402
from yolo_prune_plugin.tools.sweep import sweep_model  # noqa: E402


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
        with driving_yolov5(backend):  # offline font patch etc., as every YOLOv5 call the plugin makes
            backend.val.run(data=str(data), weights=str(f), imgsz=imgsz, batch_size=batch, device=device,
                            workers=workers, iou_thres=0.6, project=str(tmp / "val"), name="p", exist_ok=True,
                            plots=False)
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


# ---------------------------------------------------------------------------------------------------
# --split: held-out mode (issue 11): calibration and evaluation images are disjoint
# ---------------------------------------------------------------------------------------------------
SPLIT_MODELS = {
    # name: (weights, data yaml, imgsz, how the held-out data YAML is made)
    "coco128": ("yolov5n.pt", "coco128.yaml", 640, "split"),
    "cornpest": ("yolov5n-cornpest.pt", "cornpest.yaml", 416, "test"),
}
LABELS = {"global": "global L1", "layerwise": "YOLOv5 prune() (layerwise)", "lamp": "LAMP",
          "obs": "obs (default: auto -> obs)"}


def _heldout_yaml(shared: Path, name: str, tmp: Path) -> Path:
    from yolo_prune_plugin.tools.heldout import retarget_data_yaml, split_data_yaml

    src = shared / "data" / SPLIT_MODELS[name][1]
    if SPLIT_MODELS[name][3] == "split":  # sorted names: first 64 -> calibration pool, last 64 -> evaluation
        return split_data_yaml(src, tmp / name, calibration=64, evaluation=64)
    return retarget_data_yaml(src, tmp / name, evaluation="test", calibration="train")


def _row(label, amount, m, dense, seconds, extra=""):
    ret = m["mAP50-95"] / dense["mAP50-95"] if dense["mAP50-95"] else float("nan")
    return (f"| {label} | {100 * amount:.0f} % | {m['P']:.3f} | {m['R']:.3f} | {m['mAP50']:.3f} | "
            f"{m['mAP50-95']:.3f} | {ret:.3f} | {seconds:.1f} |{extra}")


def split_benchmark(args, backend) -> int:
    from yolo_prune_plugin.prune import obs as obs_methods
    from yolo_prune_plugin.prune.calibration import load_calibration_images
    from yolo_prune_plugin.backend.evaluation import evaluate, evaluate_weights
    from yolo_prune_plugin.tools.sweep import CachedBatches, _fused, run_sweep

    shared = Path(args.shared)
    amounts = [float(a) for a in args.amounts.split(",") if a]
    meths = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    seed_amounts = [float(a) for a in args.seed_amounts.split(",") if a]
    cal_opts = PruneConfig().calibration
    out_lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        out_lines.append(s)

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for name in [m for m in args.models.split(",") if m]:
            wname, _, imgsz, _ = SPLIT_MODELS[name]
            weights = shared / "weights" / wname
            data = _heldout_yaml(shared, name, tmp)
            ckpt = load_checkpoint(weights)
            src = (ckpt.get("ema") or ckpt["model"]).float().eval()
            settings = make_settings(data, imgsz, args.batch_size, args.device, False, args.workers, backend)
            t0 = time.perf_counter()
            batches = CachedBatches(make_dataloader(settings, 32, backend))
            decode_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            dense = evaluate(_fused(copy.deepcopy(src)), settings, batches, backend).to_dict()
            dense_s = time.perf_counter() - t0
            rows = [_row("dense", 0.0, dense, dense, dense_s)]
            cal = {}

            def calib(seed: int, n: int = cal_opts.images):
                if (seed, n) not in cal:
                    cal[(seed, n)] = load_calibration_images(settings.data, imgsz, n=n, batch_size=cal_opts.batch_size,
                                                             seed=seed, device=settings.device)
                return cal[(seed, n)]

            def point(method, amount, seed=cal_opts.seed, n=cal_opts.images, recal=False, **obs_over):
                """Prune a copy of the model (obs: ObsOptions defaults unless overridden) and evaluate it."""
                from yolo_prune_plugin.prune.unstructured import apply_masks, conv_layers
                from yolo_prune_plugin.prune.bn_recalibration import recalibrate_bn

                model = copy.deepcopy(src)
                c = calib(seed, n) if method == "obs" else None
                t1 = time.perf_counter()
                if method == "obs":
                    layers = conv_layers(model)
                    masks, _ = obs_methods.obs_prune(model, layers, amount, c, **obs_over)
                    with torch.no_grad():
                        apply_masks(layers, masks)
                else:
                    prune_model(model, amount, method, log=False)
                if recal:
                    recalibrate_bn(model, c)
                prune_s = time.perf_counter() - t1
                m = evaluate(_fused(model), settings, batches, backend).to_dict()
                return m, prune_s

            spread, base = {}, {}
            for amount in amounts:
                for method in meths:
                    m, s = point(method, amount)
                    rows.append(_row(LABELS.get(method, method), amount, m, dense, s))
                    if method == "obs":
                        base[amount] = m
                    print(rows[-1], flush=True)
                    if method == "obs" and len(seeds) > 1 and (not seed_amounts or amount in seed_amounts):
                        vals = [m["mAP50-95"]] + [point("obs", amount, seed=sd)[0]["mAP50-95"] for sd in seeds[1:]]
                        spread[amount] = vals
            say(f"\n### {name}: {wname} at {imgsz}, held-out ({'coco128 sorted names: calibration pool = first 64, evaluation = last 64' if name == 'coco128' else 'calibrate on train, evaluate on test (117 images)'}), {date.today()}")
            say(f"dense val pass {dense_s:.1f} s (decoding {decode_s:.1f} s once); time = prune s (obs: incl. its calibration forward passes), dense: its val pass")
            say("| method | sparsity | P | R | mAP50 | mAP50-95 | retention | time s |")
            say("|---|---|---|---|---|---|---|---|")
            for r in rows:
                say(r)
            if spread:
                say(f"\nobs (default) over calibration seeds {seeds}: " + "; ".join(
                    f"{100 * a:.0f} %: mAP50-95 {min(v):.3f}-{max(v):.3f}, mean {sum(v) / len(v):.3f}, "
                    f"spread +-{(max(v) - min(v)) / 2:.4f}, retention {sum(v) / len(v) / dense['mAP50-95']:.3f}"
                    for a, v in spread.items()))
            if args.contrib:
                say("\nWhat each change contributed (obs, seed 0, mAP50-95 / retention):")
                contrib_amounts = [float(a) for a in args.contrib_amounts.split(",") if a] or amounts
                say("| variant | " + " | ".join(f"{100 * a:.0f} %" for a in contrib_amounts) + " |")
                say("|---|" + "---|" * len(contrib_amounts))
                variants = [("obs default (32 images + mirrored, 2 gradual passes, <= 256 Hessian rows per column, "
                             "global-L1 counts)", dict()),
                            ("steps: 1 (one pass, half the time; the former default)", dict(steps=1)),
                            ("16 calibration images (the former default)", dict(n=16))]
                if args.contrib_all:
                    variants += [("all Hessian rows (samples_per_column: 0)", dict(samples_per_column=0)),
                                 ("+ BN recalibration on the calibration images (not adopted)", dict(recal=True))]
                for label, kw in variants:
                    cells = []
                    for amount in contrib_amounts:
                        if label.startswith("obs default") and amount in base:
                            m = base[amount]
                        else:
                            m, _ = point("obs", amount, **kw)
                        cells.append(f"{m['mAP50-95']:.3f} / {m['mAP50-95'] / dense['mAP50-95']:.3f}")
                    say(f"| {label} | " + " | ".join(cells) + " |")
            if args.costs:
                # (1) train-end work with the default method, before-metrics reused, vs one val pass of the model
                from yolo_prune_plugin.pipeline import RunContext
                from yolo_prune_plugin.pipeline import run as pipeline_run

                local = tmp / name / wname
                local.write_bytes(weights.read_bytes())
                t1 = time.perf_counter()
                evaluate_weights(local, settings, backend=backend)
                val_s = time.perf_counter() - t1
                cfg = PruneConfig(method=args.cost_method, amount=0.5, overwrite=True)
                from yolo_prune_plugin.backend.evaluation import Metrics

                before = Metrics(dense["P"], dense["R"], dense["mAP50"], dense["mAP50-95"])
                t1 = time.perf_counter()
                ctx = RunContext(backend, settings.device, imgsz, settings)
                entry = pipeline_run(local, cfg, ctx, before=before, before_source="training's final validation")
                end_s = time.perf_counter() - t1
                obs_s = entry.method_details.get("seconds", float("nan"))
                n_cal = entry.method_details.get("calibration_images", cal_opts.images)
                say(f"\nCosts ({name}): train-end work with the default method at 50 % (calibration load, obs, "
                    f"save, val of the pruned model; before-metrics reused) {end_s:.1f} s vs one val pass "
                    f"of {wname} {val_s:.1f} s -> ratio {end_s / val_s:.2f} (target <= 1.15); obs {obs_s:.1f} s "
                    f"for {n_cal} images (+flip) = {obs_s / n_cal:.2f} s per calibration image")
                # (2) N-point sweep vs N separate val.run
                sweep_amounts = [float(a) for a in args.sweep_amounts.split(",") if a]
                pts = [("global", a) for a in sweep_amounts]
                t1 = time.perf_counter()
                run_sweep(local, data, amounts=",".join(map(str, sweep_amounts)), methods="global", imgsz=imgsz,
                          batch_size=args.batch_size, device=args.device, workers=args.workers, out=tmp / name / "sw",
                          echo=lambda s: None)
                sweep_s = time.perf_counter() - t1
                sep = time_separate_val(backend, ckpt, pts, data, imgsz, args.batch_size, args.device,
                                        args.workers, tmp / name)
                sep += sep / len(pts)  # the sweep's dense baseline is one more val pass
                say(f"Sweep of {len(pts)} points + dense (yolo-prune sweep, whole command) {sweep_s:.1f} s vs the same as "
                    f"separate val.run calls {sep:.1f} s -> ratio {sweep_s / sep:.2f} (target <= 0.8)")
    print("\n===== summary =====")
    print("\n".join(out_lines))
    return 0


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
    ap.add_argument("--split", action="store_true",
                    help="held-out mode: calibration and evaluation images disjoint (coco128 split + corn-pest test)")
    ap.add_argument("--models", default="coco128,cornpest", help="--split: which models")
    ap.add_argument("--seeds", default="0,1,2", help="--split: calibration seeds for the default method's spread")
    ap.add_argument("--seed-amounts", default="", help="--split: amounts for the seed spread (default: all)")
    ap.add_argument("--contrib", action="store_true", help="--split: rows of what each change contributed")
    ap.add_argument("--costs", action="store_true", help="--split: cost ratios (train-end work, sweep)")
    ap.add_argument("--contrib-all", action="store_true", help="--split --contrib: also the slower variants")
    ap.add_argument("--contrib-amounts", default="", help="--split --contrib: amounts (default: --amounts)")
    ap.add_argument("--sweep-amounts", default="0.1,0.3,0.5,0.7", help="--split --costs: the sweep's points")
    ap.add_argument("--cost-method", default=PruneConfig().method,
                    help="--split --costs: method of the train-end cost row (default: the config default)")
    args = ap.parse_args()
    if args.split:
        if args.methods == "global,lamp,obs,layerwise":
            args.methods = "global,layerwise,lamp,obs"
        if args.amounts == "0.3,0.5":
            args.amounts = "0.3,0.5,0.7"
        torch.set_num_threads(min(2, torch.get_num_threads()))
        return split_benchmark(args, get_backend())

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
        # coco128's train split IS its val split: this mode knowingly calibrates on evaluated images (--split doesn't)
        cfg = PruneConfig(calibration=CalibrationOptions(allow_overlap=True))
        result = sweep_model(ckpt["model"], settings, amounts, methods, cfg, backend, echo=print)
        sweep_s = time.perf_counter() - t0
        n = len(result["points"])
        separate_s = None
        if not args.skip_separate:
            calib = None
            if "obs" in methods:
                from yolo_prune_plugin.prune.calibration import load_calibration_images

                calib = load_calibration_images(settings.data, args.img, n=16, batch_size=8, seed=0,
                                                device=settings.device, allow_overlap=True)
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
    print("\n(val = train: coco128's calibration images are also evaluated; use --split for held-out numbers)")
    print(f"\nRetention benchmark, {date.today()}, yolov5n on {args.data} at {args.img}, device {gpu or 'CPU ' + cpu}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| method | sparsity | P | R | mAP50 | mAP50-95 | retention |")
    print("|---|---|---|---|---|---|---|")
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
