"""Prune to a budget at train end: `yolo-prune train --prune-target-drop` around a real YOLOv5 training."""

from __future__ import annotations

import json

import pytest
import torch

from yolo_prune_plugin.backend.patches import driving_yolov5
from yolo_prune_plugin.cli import main
from yolo_prune_plugin.report import validate_report

from testkit import SHARED_WEIGHTS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_end_hook_searches_the_budget(backend, coco8_yaml, tmp_path):
    """One epoch from the released yolov5n on coco8 (train and val disjoint) at 96 px, then the budget search on
    the run's best.pt: the chosen amount meets `--prune-target-drop` on the search images and on the full val
    split, and YOLOv5's own validator on the written file reproduces the reported numbers."""
    cfg = tmp_path / "prune.yaml"
    cfg.write_text("method: global\ntarget: {max_evals: 3}\n")
    max_drop = 0.05
    rc = main(["train", "--data", str(coco8_yaml), "--weights", str(SHARED_WEIGHTS), "--img", "96", "--epochs", "1",
               "--batch-size", "4", "--workers", "0", "--device", "cpu", "--noplots", "--project",
               str(tmp_path / "runs"), "--name", "exp", "--prune-config", str(cfg),
               "--prune-target-drop", str(max_drop)])
    assert rc == 0
    run = tmp_path / "runs" / "exp"
    entry = validate_report(json.loads((run / "prune_report.json").read_text()))[0]
    t = entry.target
    assert t["evaluations"] == len(t["trace"]) == 3 and t["options"]["max_drop"] == max_drop
    assert entry.metrics_before_source == "YOLOv5's final validation"
    assert entry.metrics_before["mAP50-95"] > 0.05  # a real model: the budget can bind
    chosen = [p for p in t["trace"] if p["amount"] == entry.amount]
    assert entry.amount > 0 and chosen and chosen[0]["meets"] and chosen[0]["drop"] <= max_drop  # search images
    full_drop = entry.metrics_before["mAP50-95"] - entry.metrics_after["mAP50-95"]
    assert t["final"]["meets"] is True and full_drop <= max_drop  # the whole val split
    with driving_yolov5(backend):
        r = backend.val.run(data=str(coco8_yaml), weights=str(run / "weights" / "best_pruned.pt"), imgsz=96,
                            batch_size=entry.eval["batch_size"], iou_thres=entry.eval["iou_thres"], device="cpu",
                            workers=0, project=str(tmp_path / "val"), plots=False)[0]
    assert r[3] == pytest.approx(entry.metrics_after["mAP50-95"], abs=0.002)
    sparsity = torch.load(run / "weights" / "best_pruned.pt")["prune"]["sparsity_after"]["sparsity"]
    assert sparsity == pytest.approx(entry.amount, abs=1e-3)
    assert (run / "budget_best.png").is_file()
