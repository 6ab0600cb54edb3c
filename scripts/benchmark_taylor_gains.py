"""Taylor channel pruning with the checkpoint's loss gains used once (fixed) vs scaled a second time (the old bug).

One-shot ``structure: channel, importance: taylor`` of a trained checkpoint, calibrated on its train split and
evaluated on a held-out split (``--eval-split``, default ``test``) that the pruner never saw. Prints mAP50-95 of
the dense model and of both variants. Usage::

    flock /tmp/bench.lock python scripts/benchmark_taylor_gains.py --weights ../shared/weights/yolov5n-cornpest.pt \\
        --data ../shared/data/cornpest.yaml --img 416 --amount 0.3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--img", type=int, default=416)
    ap.add_argument("--amount", type=float, default=0.3)
    ap.add_argument("--eval-split", default="test")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import yaml

    from yolo_prune_plugin.api import prune
    from yolo_prune_plugin.config import config_from_dict
    from yolo_prune_plugin.prune import channel as channel_mod
    from yolo_prune_plugin.prune.calibration import _scaled_hyp

    tmp = Path(tempfile.mkdtemp(prefix="taylor-gains-"))
    try:
        d = yaml.safe_load(Path(a.data).read_text())
        d["path"] = str((Path(a.data).parent / d["path"]).resolve())
        d["val"] = d[a.eval_split]  # evaluation on the held-out split; calibration stays on train
        data = tmp / "data.yaml"
        data.write_text(yaml.safe_dump(d))
        weights = tmp / "model.pt"
        shutil.copy(a.weights, weights)
        cfg = config_from_dict({"amount": a.amount, "structure": "channel", "channel": {"importance": "taylor"},
                                "overwrite": True})
        real = channel_mod.accumulate_loss_gradients

        def twice(model, images, targets, *args, **kw):  # the old code: model.hyp scaled a second time
            own = model.hyp
            model.hyp = _scaled_hyp(dict(own), model.model[-1], int(images.shape[-1]))
            try:
                return real(model, images, targets, *args, **kw)
            finally:
                model.hyp = own

        rows = {}
        for name in ("fixed (gains once)", "old (gains scaled twice)"):
            if name.startswith("old"):
                channel_mod.accumulate_loss_gradients = twice
            try:
                [e] = prune(weights, data, cfg, imgsz=a.img, device="cpu", workers=0, report_dir=tmp)
            finally:
                channel_mod.accumulate_loss_gradients = real
            rows["dense"] = e.metrics_before["mAP50-95"]
            rows[name] = e.metrics_after["mAP50-95"]
        print(f"{Path(a.weights).name} @ {a.img}, channel taylor {a.amount}, eval split {a.eval_split}")
        for k, v in rows.items():
            print(f"  {k:<26} mAP50-95 {v:.4f}  retention {v / rows['dense']:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
