#!/usr/bin/env python
"""Benchmark: does the plugin's fine-tune win the accuracy back? One script for both structures.

    flock /tmp/bench.lock python scripts/benchmark_recovery.py --epochs 10 \\
        --rows channel:0.5,channel:0.5:distill,dense,channel:0.3 --out /tmp/bench_recovery

Defaults: corn-pest (third-party yolov5n, 4 classes) at 416 px. Every fine-tune trains on the data's ``train``
split (400 images) with the same recipe (the plugin's defaults: lr_scale 0.1, no warm-up, one optimizer step
per batch, ``keep: auto`` — the last epoch on a val split of ``--select`` < 100 images —, the checkpoint's saved
hyp/optimizer, batch 16, ``--seed``) and every number is the plugin's validation (YOLOv5's ``val.run`` without the
NMS time limit) on the untouched ``test`` split, at the training image size. YOLOv5's per-epoch validation (which
picks ``best.pt``) runs on ``--select`` images (a seeded random sample; until 2026-12-06 the first ones by name) of
the data's own ``val`` split, never on the test split (``noval`` is not usable: YOLOv5 7.0.14 then fails on
``map50s``); both ``best.pt`` and ``last.pt`` of every fine-tune are scored (columns best.pt / last.pt).

Rows:
* dense                    the checkpoint as is
* dense + N ep FT          the dense checkpoint fine-tuned with the identical recipe (the reference)
* STRUCTURE:AMOUNT[:distill|:reg][:KEY=VALUE...]  e.g. ``channel:0.5``, ``channel:0.5:distill``, ``channel:0.5:reg``
                           (``finetune.recipe: regularize``), ``channel:0.5:lr_schedule=cosine:lr_scale=0.3`` (any
                           ``finetune`` key, YAML-typed; ``channel:0.5:distill:distill_features=1`` adds the
                           feature term, ``...:distill_weight=0:...`` leaves it alone), ``obs:0.7``, ``global:0.5``: pruned
                           and fine-tuned through the plugin's pipeline (``pipeline.run``, as ``yolo-prune prune
                           --finetune-epochs N``); one-shot and fine-tuned numbers
``--epochs 5,10,20`` runs every row at each length (separate runs: a curve of budgets, not one run's epochs).
Retention = mAP50-95 / mAP50-95 of the dense FT (and of the dense file). Wall time per epoch is the mean of the fine-tune's epochs.
Results are appended to ``<out>/benchmark_recovery.json`` after every row (a cut run keeps its rows).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = next((p for p in (ROOT.parent / "shared", ROOT.parents[1] / "shared") if p.is_dir()), ROOT.parent / "shared")


def _split_yamls(src: Path, out: Path, eval_split: str, select: int) -> tuple[Path, Path]:
    """Two data YAMLs: for training, ``val`` = ``select`` images (seeded random) of the data's own ``val`` split (YOLOv5's
    per-epoch validation picks ``best.pt`` on them, cheaply, never on the evaluation split); for the plugin's
    evaluation, ``val`` = ``eval_split`` (``test``)."""
    import yaml

    from yolo_prune_plugin.backend.evaluation import write_absolute_data_yaml

    p = write_absolute_data_yaml(src, out)
    d = yaml.safe_load(p.read_text())
    root = Path(d["path"])
    images = sorted(f for f in (root / d["val"]).iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
    sel = out / "select"  # links, so that YOLOv5's label cache is written here, not into the shared data
    for kind in ("images", "labels"):
        (sel / kind).mkdir(parents=True, exist_ok=True)
    # a seeded random sample, not the first images by name: corn-pest's first 32 `valid` images are one class, and
    # YOLOv5's best.pt pick on them followed that class (docs/benchmarks.md, issue 26 second round)
    for f in sorted(random.Random(0).sample(images, min(select, len(images)))):
        label = Path(str(f.parent).replace("images", "labels")) / f"{f.stem}.txt"
        for src, dst in ((f, sel / "images" / f.name), (label, sel / "labels" / label.name)):
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
    train = out / "train_data.yaml"
    train.write_text(yaml.safe_dump({**d, "val": str(sel / "images")}, sort_keys=False))
    p.write_text(yaml.safe_dump({**d, "val": d[eval_split]}, sort_keys=False))
    return train, p


def common_arguments(ap: argparse.ArgumentParser, out: str) -> None:
    """The data, model and machine options shared with ``benchmark_regularize.py`` (same split, same recipe)."""
    ap.add_argument("--weights", default=str(SHARED / "weights" / "yolov5n-cornpest.pt"))
    ap.add_argument("--data", default=str(SHARED / "data" / "cornpest.yaml"))
    ap.add_argument("--eval-split", default="test", help="split to evaluate on (never trained on; default test)")
    ap.add_argument("--imgsz", type=int, default=416, help="train and evaluation image size (default 416)")
    ap.add_argument("--select", type=int, default=32,
                    help="images of the data's val split for YOLOv5's per-epoch validation (best.pt pick; default 32)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(ap, "runs/benchmark_recovery")
    ap.add_argument("--epochs", default="10", help="fine-tune epochs, or a comma-separated list (one run each)")
    ap.add_argument("--rows", default="channel:0.5,channel:0.5:distill,dense,channel:0.3",
                    help="comma-separated rows in the order they run: STRUCTURE_OR_METHOD:AMOUNT[:distill], or dense "
                    "(the dense fine-tune reference)")
    ap.add_argument("--lr-scale", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0, help="YOLOv5's training seed (data order, augmentation)")
    ap.add_argument("--distill-weight", type=float, default=1.0)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from yolo_prune_plugin import pipeline
    from yolo_prune_plugin.backend.evaluation import NMSTimeoutCounter, evaluate, evaluate_weights, make_settings
    from yolo_prune_plugin.backend.loading import get_backend, load_checkpoint
    from yolo_prune_plugin.backend.patches import driving_yolov5
    from yolo_prune_plugin.config import METHODS, config_from_dict
    from yolo_prune_plugin.training.finetune import checkpoint_train_options, finetune_checkpoint

    b = get_backend()
    nms = NMSTimeoutCounter()
    logging.getLogger("yolov5").addHandler(nms)
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_data, data = _split_yamls(Path(args.data), out, args.eval_split, args.select)
    weights = Path(args.weights).expanduser().resolve()
    ckpt = load_checkpoint(weights, b)
    settings = make_settings(data, args.imgsz, 32, args.device, workers=args.workers, backend=b)
    device = "cpu" if settings.device.type == "cpu" else str(settings.device.index or 0)
    opt = checkpoint_train_options(ckpt, train_data, args.imgsz, args.batch_size, device, args.workers, False)
    opt.update(noplots=True, cache="ram", seed=args.seed, project=str(out))  # noval: YOLOv5 7.0.14 fails (map50s unbound)
    ctx = pipeline.RunContext(b, settings.device, args.imgsz, settings, opt)
    result: dict = {"args": vars(args), "device": str(settings.device), "data": str(data), "rows": []}
    t_all = time.perf_counter()

    def save(row: dict) -> None:
        result["rows"].append(row)
        (out / "benchmark_recovery.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"[bench] {row['model']}: " + "  ".join(f"{k} {row[k]}" for k in ("mAP50-95", "oneshot_mAP50-95",
                                                                                "epoch_s") if row.get(k) is not None),
              flush=True)

    def epoch_s(history: list[dict]) -> float:
        return round(statistics.mean(h["epoch_s"] for h in history), 1) if history else None

    def row(spec: str, epochs: int) -> None:
        import yaml

        with driving_yolov5(b):
            kind, amount, *rest = spec.split(":")
            extra = {k: yaml.safe_load(v) for k, v in (r.split("=", 1) for r in rest if "=" in r)}
            distill, reg = "distill" in rest, "reg" in rest
            tag = ("_kd" if distill else "") + ("_reg" if reg else "") + "".join(f"_{k}{v}" for k, v in extra.items())
            cfg = {"amount": float(amount), "overwrite": True, "suffix": f"_{kind}{amount}{tag}_{epochs}",
                   "finetune": {"epochs": epochs, "lr_scale": args.lr_scale, "distill": distill,
                                "distill_weight": args.distill_weight,
                                "recipe": "regularize" if reg else "plain", **extra}}
            cfg.update({"structure": "channel"} if kind == "channel" else {"method": kind})
            if kind != "channel" and kind not in METHODS:
                raise SystemExit(f"--rows {spec}: expected channel or one of {', '.join(METHODS)}")
            n0 = nms.count
            src = out / f"src_{spec.replace(':', '_').replace('=', '')}_{epochs}.pt"  # a private copy to write beside
            src.write_bytes(weights.read_bytes())
            e = pipeline.run(src, config_from_dict(cfg, source=f"--rows {spec}"), ctx, before=dense,
                             before_source="dense, validated once")
            after, one = e.metrics_after or {}, e.metrics_oneshot or {}
            pen = (e.finetune.get("phases") or {}).get("regularize") or {}
            ft_phase = (e.finetune.get("phases") or {}).get("finetune", True)
            ft_hist = e.finetune["history"] if ft_phase else []
            label = " (distill)" if distill else " (recipe regularize)" if reg else ""
            label += "".join(f" {k}={v}" for k, v in extra.items())
            scored = {}  # best.pt and last.pt of the (last) fine-tune run, both on the evaluation split
            if ft_phase:
                for f in ("best.pt", "last.pt"):
                    path = Path(e.finetune["run"]) / "weights" / f
                    if path.is_file():
                        scored[f] = evaluate_weights(path, settings, backend=b).map
            save({"model": f"{spec} + {epochs} ep FT{label}", "epochs": epochs, **after,
                  "oneshot_mAP50-95": one.get("mAP50-95"), "oneshot_mAP50": one.get("mAP50"),
                  "epoch_s": epoch_s(pen.get("history", []) + ft_hist),
                  "seconds": round(pen.get("seconds", 0) + (e.finetune["seconds"] if ft_hist else 0), 1),
                  "removed_mAP50-95": (pen.get("metrics_removed") or {}).get("mAP50-95"),
                  "best_mAP50-95": scored.get("best.pt"), "last_mAP50-95": scored.get("last.pt"),
                  "kept": e.finetune.get("kept") or Path(e.finetune["source"]).name,
                  "residual": pen.get("residual"), "removal_output_change": pen.get("removal_output_change"),
                  "distill": e.finetune.get("distill"),
                  "params": [(e.channels or {}).get(k) for k in ("params_before", "params_after")],
                  "nms_timeouts": nms.count - n0, "history": e.finetune["history"]})

    with driving_yolov5(b):
        n0 = nms.count
        dense = evaluate(pipeline.source_model(ckpt).float().eval().fuse(), settings, backend=b)
        save({"model": "dense", **dense.to_dict(), "nms_timeouts": nms.count - n0})
        for epochs in [int(x) for x in str(args.epochs).split(",") if x.strip()]:
            for spec in [s.strip() for s in args.rows.split(",") if s.strip()]:
                if not spec.startswith("dense"):
                    row(spec, epochs)
                    continue
                import yaml

                extra = {k: yaml.safe_load(v) for k, v in (r.split("=", 1) for r in spec.split(":")[1:] if "=" in r)}
                n0 = nms.count
                ft = finetune_checkpoint(weights, opt, epochs, masks=None, lr_scale=args.lr_scale, project=out,
                                         name="dense_ft", backend=b, **{"keep": "last", **extra})  # as the plugin
                m = evaluate_weights(ft.best, settings, backend=b)
                best = ft.save_dir / "weights" / "best.pt"
                scored = {f: evaluate_weights(f, settings, backend=b).map for f in (best,) if f != ft.best and f.is_file()}
                save({"model": f"{spec} + {epochs} ep FT", "epochs": epochs, **m.to_dict(),
                      "best_mAP50-95": scored.get(best, m.map), "last_mAP50-95": m.map, "kept": ft.kept,
                      "epoch_s": epoch_s(ft.history),
                      "seconds": round(ft.seconds, 1), "nms_timeouts": nms.count - n0, "history": ft.history})
    refs = {r.get("epochs"): r for r in result["rows"] if r["model"].startswith("dense") and "ep FT" in r["model"]}
    dense_map = result["rows"][0]["mAP50-95"]
    header = (f"{'row':<56} {'one-shot':>9} {'mAP50':>7} {'mAP50-95':>9} {'vs file':>8} {'vs dense FT':>11} "
              f"{'best.pt':>8} {'last.pt':>8} {'s/epoch':>8}")
    lines = [f"recovery benchmark: {weights.name}, train split -> {args.eval_split} split @ {args.imgsz}, "
             f"{args.epochs} epochs, lr_scale {args.lr_scale}, batch {args.batch_size}", header, "-" * len(header)]

    def num(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else "-"

    for r in result["rows"]:
        ref = refs.get(r.get("epochs"))
        rel = f"{r['mAP50-95'] / ref['mAP50-95']:.3f}" if ref and ref.get("mAP50-95") else "-"
        lines.append(f"{r['model']:<56} {num(r.get('oneshot_mAP50-95')):>9} {r['mAP50']:>7.4f} {r['mAP50-95']:>9.4f} "
                     f"{r['mAP50-95'] / dense_map:>8.3f} {rel:>11} {num(r.get('best_mAP50-95')):>8} "
                     f"{num(r.get('last_mAP50-95')):>8} {r.get('epoch_s') or '-':>8}"
                     + (f"  ({r['nms_timeouts']} NMS timeouts)" if r['nms_timeouts'] else ""))
    lines.append(f"(total {time.perf_counter() - t_all:.0f} s; NMS without time limit in the plugin's validation)")
    print("\n".join(lines))
    result["table"] = lines
    (out / "benchmark_recovery.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
