"""Upstream ultralytics/yolov5 checkouts (top-level train/val/export/models/utils): the installed PyPI
package's folder stands in for a checkout. Each test runs in a fresh process (YOLOv5 is imported once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkout() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("yolov5")
    return Path(spec.origin).parent


def _run(args, cwd, env_extra=None, timeout=600):
    env = {**os.environ, **(env_extra or {})}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "yolo_prune_plugin.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_not_a_checkout_is_a_clear_error(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"x")  # the weights path exists: the checkout is what is wrong
    out = _run(["prune", "--yolov5-dir", str(tmp_path), "--weights", "x.pt"], cwd=tmp_path)
    assert out.returncode == 1
    assert f"{tmp_path} is not a YOLOv5 checkout: missing train.py" in out.stderr


def test_prune_and_train_with_checkout(checkout, shared, coco8_yaml, small_ckpt, tmp_path):
    """In one process with a checkout: ``YOLO_PRUNE_YOLOV5_DIR`` selects it for `yolo-prune prune` (train/val/models
    imported top-level), then `yolo-prune train --yolov5-dir` (the flag for the same folder) trains and prunes at
    train end."""
    code = ("import json, sys; from yolo_prune_plugin.cli import main\n"
            "rc = main(json.loads(sys.argv[1]))\n"
            "from yolo_prune_plugin.backend.loading import get_backend; b = get_backend()\n"
            "print('BACKEND', b.kind, b.train.__name__, b.yolo.__name__, flush=True)\n"
            "sys.exit(rc or main(json.loads(sys.argv[2])))\n")
    prune = ["prune", "--weights", str(small_ckpt), "--amount", "0.3", "--device", "cpu"]
    train = ["train", "--yolov5-dir", str(checkout), "--data", str(coco8_yaml), "--weights",
             str(shared / "weights" / "yolov5n.pt"), "--img", "64", "--epochs", "1", "--batch-size", "4", "--workers",
             "0", "--device", "cpu", "--noplots", "--project", str(tmp_path / "runs"), "--name", "exp",
             "--prune-amount", "0.25"]
    env = {**os.environ, "YOLO_PRUNE_YOLOV5_DIR": str(checkout), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(prune), json.dumps(train)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BACKEND checkout train models.yolo" in out.stdout
    ckpt = torch.load(small_ckpt.with_name("best_pruned.pt"))
    assert abs(ckpt["prune"]["sparsity_after"]["sparsity"] - 0.3) < 1e-3
    entry = json.loads((tmp_path / "runs" / "exp" / "prune_report.json").read_text())["results"][0]
    assert abs(entry["sparsity_after"]["sparsity"] - 0.25) < 1e-3
    assert entry["metrics_before"] is not None and entry["metrics_after"] is not None
