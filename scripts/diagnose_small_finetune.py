#!/usr/bin/env python
"""Why does a short fine-tune on a small training set lower held-out mAP, even for the dense model? (issue 26)

    python scripts/diagnose_small_finetune.py --data /tmp/cp64/cp64.yaml --variants base,bnfreeze,noaug,mosaic0 \\
        --out /tmp/small_ft

Fine-tunes the *dense* checkpoint (no pruning) with the plugin's recipe (``finetune_checkpoint``: lr_scale 0.1, no
warm-up, the checkpoint's own hyp, batch 16, seed 0, the last epoch) on the data YAML's ``train`` split and scores
``last.pt`` and ``best.pt`` with the plugin's validation (no NMS time limit) on its ``test`` split. Variants:

* ``base``      the recipe as is
* ``bnfreeze``  BatchNorm layers in eval mode on every training batch (running statistics and momentum frozen)
* ``noaug``     no augmentation (mosaic, mixup, copy-paste, scale, translate, rotation, shear, HSV all 0)
* ``mosaic0``   mosaic off, the other augmentation kept

YOLOv5's per-epoch validation runs on the YAML's ``val`` split (its numbers are printed as ``val``). Results are
appended to ``<out>/results.json`` (key ``<variant>_<epochs>``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = next((p for p in (ROOT.parent / "shared", ROOT.parents[1] / "shared") if p.is_dir()), ROOT.parent / "shared")

VARIANTS = ("base", "bnfreeze", "noaug", "mosaic0")
NO_AUG = dict(mosaic=0.0, mixup=0.0, copy_paste=0.0, scale=0.0, translate=0.0, degrees=0.0, shear=0.0,
              perspective=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0)


def _freeze_bn(*args, **kwargs) -> None:
    """``on_train_batch_start``: BatchNorm of the model ``train()`` is training (found in its frame) in eval mode."""
    import torch

    f = inspect.currentframe().f_back
    while f is not None and not (f.f_code.co_name == "train" and "model" in f.f_locals):
        f = f.f_back
    for m in f.f_locals["model"].modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(SHARED / "weights" / "yolov5n-cornpest.pt"))
    ap.add_argument("--data", required=True, help="data YAML with train, val and test splits (absolute paths)")
    ap.add_argument("--variants", default="base,bnfreeze,noaug,mosaic0")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--imgsz", type=int, default=416)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/small_ft")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {', '.join(bad)}; expected some of {', '.join(VARIANTS)}")

    import torch
    import yaml

    torch.set_num_threads(args.threads)
    from yolo_prune_plugin.backend.evaluation import evaluate_weights, make_settings, write_absolute_data_yaml
    from yolo_prune_plugin.backend.loading import get_backend, load_checkpoint
    from yolo_prune_plugin.backend.patches import driving_yolov5
    from yolo_prune_plugin.training.finetune import checkpoint_train_options, finetune_checkpoint

    b = get_backend()
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    train = write_absolute_data_yaml(Path(args.data), out)
    d = yaml.safe_load(train.read_text())
    if not d.get("test"):
        raise SystemExit(f"--data {args.data}: needs a 'test' split to score on")
    ev = out / "eval.yaml"
    ev.write_text(yaml.safe_dump({**d, "val": d["test"]}, sort_keys=False))
    weights = Path(args.weights).expanduser().resolve()
    ckpt = load_checkpoint(weights, b)
    settings = make_settings(ev, args.imgsz, 32, "cpu", workers=1, backend=b)
    path = out / "results.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    with driving_yolov5(b):
        res.setdefault("dense", evaluate_weights(weights, settings, backend=b).map)
        for v in variants:
            opt = checkpoint_train_options(ckpt, train, args.imgsz, 16, "cpu", 1, False)
            opt.update(noplots=True, cache="ram", seed=0, project=str(out))
            hyp = dict(opt["hyp"]) if isinstance(opt["hyp"], dict) else yaml.safe_load(Path(opt["hyp"]).read_text())
            hyp.update(NO_AUG if v == "noaug" else {"mosaic": 0.0} if v == "mosaic0" else {})
            opt["hyp"] = hyp
            hooks = [("on_train_batch_start", _freeze_bn)] if v == "bnfreeze" else []
            t0 = time.time()
            ft = finetune_checkpoint(weights, opt, args.epochs, masks=None, project=out, name=f"ft_{v}", backend=b,
                                     keep="last", hooks=hooks, lr_scale=0.1)
            res[f"{v}_{args.epochs}"] = {
                "last": evaluate_weights(ft.last, settings, backend=b).map,
                "best": evaluate_weights(ft.save_dir / "weights" / "best.pt", settings, backend=b).map,
                "s": round(time.time() - t0, 1), "val": [round(r["mAP50-95"], 4) for r in ft.history]}
            print("[diagnose]", v, res[f"{v}_{args.epochs}"], flush=True)
            path.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
