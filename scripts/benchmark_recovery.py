#!/usr/bin/env python
"""Benchmark: one-shot pruning vs one-shot + masked fine-tune vs the dense model fine-tuned the same way.

    python scripts/benchmark_recovery.py --epochs 3 --imgsz 320 --device cpu --out /tmp/bench_recovery

Rows (all validated with YOLOv5's val.run under the same settings: data, image size, val batch, IoU 0.6):

* dense            the input checkpoint as is
* one-shot         ``amount`` global sparsity (``--method``), no training
* one-shot + FT    ``--epochs`` epochs of masked fine-tuning with YOLOv5's train.main (pruned weights held at 0)
* dense FT         the dense checkpoint fine-tuned with exactly the same settings (the reference)

Retention = mAP50-95 / mAP50-95 of the dense FT with the same warmup setting. ``--warmup both`` runs the
fine-tunes once with YOLOv5's lr warmup and once without (the plugin's default). Defaults use the shared
yolov5n + coco128 (train split == val split, so the fine-tune numbers measure fitting, not generalisation).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=str(SHARED / "weights" / "yolov5n.pt"))
    ap.add_argument("--data", default=None, help="dataset YAML (default: shared coco128 with an absolute path)")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tune epochs (default 3)")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--amount", type=float, default=0.5)
    ap.add_argument("--method", default="global")
    ap.add_argument("--lr-scale", type=float, default=0.1, help="fine-tune lr0 = lr_scale x hyp lr0 (default 0.1)")
    ap.add_argument("--warmup", choices=("off", "on", "both"), default="off",
                    help="YOLOv5's lr warmup during the fine-tunes (default off, the plugin's default)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="", help="cpu, 0, ... (default: GPU when available)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache", default=None, help="YOLOv5 --cache (ram/disk) for the fine-tunes")
    ap.add_argument("--out", default="runs/benchmark_recovery", help="working folder (run folders, JSON)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (on a busy shared CPU, 1 is several times faster than oversubscribing)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from yolo_prune_plugin.backend.loading import get_backend, load_checkpoint
    from yolo_prune_plugin.api import train_opt
    from yolo_prune_plugin.backend.evaluation import NMSTimeoutCounter, evaluate_weights, make_settings, write_absolute_data_yaml
    from yolo_prune_plugin.prune.unstructured import prune_model
    from yolo_prune_plugin.pipeline import _stripped
    from yolo_prune_plugin.training.finetune import finetune_checkpoint
    import torch

    b = get_backend()
    nms = NMSTimeoutCounter()  # YOLOv5's NMS gives up after 0.5 s + 0.05 s/image: on a busy CPU it drops detections
    logging.getLogger("yolov5").addHandler(nms)
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = write_absolute_data_yaml(args.data or SHARED / "data" / "coco128.yaml", out)
    weights = Path(args.weights).expanduser().resolve()
    settings = make_settings(data, args.imgsz, args.batch_size * 2, args.device, workers=args.workers, backend=b)
    dev = settings.device
    device_str = "cpu" if dev.type == "cpu" else str(dev.index or 0)
    rows: list[dict] = []
    t_all = time.perf_counter()

    def evaluate(name: str, path: Path, sparsity: float, seconds: float = 0.0, extra: dict | None = None) -> dict:
        before = nms.count
        m = evaluate_weights(path, settings, backend=b).to_dict()
        row = {"model": name, "file": str(path), "sparsity": round(sparsity, 4), **m, "train_s": round(seconds, 1),
               "nms_timeouts": nms.count - before, **(extra or {})}
        rows.append(row)
        print(f"[bench] {name}: mAP50 {m['mAP50']:.4f}  mAP50-95 {m['mAP50-95']:.4f}", flush=True)
        return row

    evaluate("dense", weights, 0.0)

    ckpt = load_checkpoint(weights, b)
    model = (ckpt.get("ema") or ckpt["model"]).float()
    res = prune_model(model, args.amount, args.method)
    oneshot = out / f"{weights.stem}_{args.method}{int(round(args.amount * 100))}.pt"
    torch.save(_stripped(ckpt, model, torch.float16), oneshot)
    evaluate(f"one-shot {args.method} {args.amount:.0%}", oneshot, res.after.sparsity)

    base = train_opt([], b, data=str(data), imgsz=args.imgsz, batch_size=args.batch_size, device=device_str,
                     workers=args.workers, noplots=True, project=str(out), cache=args.cache)
    warmups = {"off": [False], "on": [True], "both": [False, True]}[args.warmup]
    for warmup in warmups:
        tag = f"warmup {'on' if warmup else 'off'}"
        common = dict(lr_scale=args.lr_scale, warmup=warmup, project=out, backend=b)
        n0 = nms.count
        ft = finetune_checkpoint(oneshot, base, args.epochs, masks="zeros", name=f"masked_w{int(warmup)}", **common)
        ft_row = evaluate(f"one-shot + {args.epochs} ep masked FT ({tag})", ft.best, res.after.sparsity, ft.seconds,
                          {"leaked": ft.leaked, "masked": ft.masked, "warmup": warmup, "train_nms_timeouts":
                           nms.count - n0, "history": ft.history})
        n0 = nms.count
        dft = finetune_checkpoint(weights, base, args.epochs, masks=None, name=f"dense_w{int(warmup)}", **common)
        d_row = evaluate(f"dense + {args.epochs} ep FT ({tag})", dft.best, 0.0, dft.seconds,
                         {"warmup": warmup, "train_nms_timeouts": nms.count - n0, "history": dft.history})
        for r in (ft_row, d_row):
            r["retention"] = round(r["mAP50-95"] / d_row["mAP50-95"], 4) if d_row["mAP50-95"] else None

    header = f"{'model':<40} {'sparsity':>8} {'mAP50':>8} {'mAP50-95':>9} {'retention':>10} {'train s':>8}"
    lines = [f"yolov5 recovery benchmark: {weights.name} on {data.name} @ {args.imgsz}, device {dev}, "
             f"{args.epochs} fine-tune epochs, lr_scale {args.lr_scale}, batch {args.batch_size}", header,
             "-" * len(header)]
    for r in rows:
        ret = f"{r['retention']:.3f}" if r.get("retention") is not None else "-"
        flag = (f"  (INVALID: {r['nms_timeouts']} NMS timeouts)" if r["nms_timeouts"] else
                f"  ({r['train_nms_timeouts']} NMS timeouts in per-epoch val)" if r.get("train_nms_timeouts") else "")
        lines.append(f"{r['model']:<40} {r['sparsity']:>8.2%} {r['mAP50']:>8.4f} {r['mAP50-95']:>9.4f} {ret:>10} "
                     f"{r['train_s']:>8.1f}{flag}")
    lines.append(f"(retention = mAP50-95 / dense FT with the same warmup; total {time.perf_counter() - t_all:.0f} s)")
    if nms.count:
        lines.append(f"WARNING: YOLOv5's NMS time limit was exceeded {nms.count} times (detections dropped; the CPU "
                     "is busy). A row's own evaluation with timeouts is INVALID; timeouts in a fine-tune's per-epoch "
                     "validation only matter if they hid the best epoch (see 'history' in the JSON)")
    print("\n".join(lines))
    (out / "benchmark_recovery.json").write_text(json.dumps({"args": vars(args), "device": str(dev), "rows": rows},
                                                             indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
