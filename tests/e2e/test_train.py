"""The hook end to end: real YOLOv5 training (a tiny run on the synthetic data), flag on / YAML / API / off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from yolo_prune_plugin.backend.patches import driving_yolov5
from yolo_prune_plugin.callbacks import HOOK_NAME
from yolo_prune_plugin.cli import main
from yolo_prune_plugin.prune.unstructured import sparsity_stats
from yolo_prune_plugin.tools.synthetic import TINY, make_dataset

from testkit import fake_train_main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synthetic"), **TINY.dataset_kwargs())


def _train_args(backend, data, project, *extra):
    o = TINY.train_overrides(data, project, "exp", yolov5_root=backend.root)
    return ["train", "--data", o["data"], "--cfg", o["cfg"], "--weights", "", "--img", str(o["imgsz"]),
            "--epochs", str(o["epochs"]), "--batch-size", str(o["batch_size"]), "--workers", "0", "--device", "cpu",
            "--noplots", "--project", o["project"], "--name", "exp", *extra]


def _sparsity(path):
    return sparsity_stats(torch.load(path)["model"]).sparsity


def test_train_flag_prunes_best_and_last_with_a_quiet_log(backend, tiny_data, tmp_path):
    """`yolo-prune train --prune-amount` in a fresh interpreter, as a user runs it, with a fresh YOLOv5 config folder
    (no Arial.ttf there: YOLOv5's ``check_dataset`` tries to fetch it, plots or not): best and last are pruned and
    evaluated, YOLOv5's validator reproduces the reported numbers, and the log has neither torch.cuda.amp
    deprecations nor a font download, while other warnings still show."""
    args = _train_args(backend, tiny_data, tmp_path / "runs", "--prune-amount", "0.3", "--prune-checkpoints",
                       "best,last")
    home = tmp_path / "home"
    home.mkdir()
    code = textwrap.dedent(f"""
        import sys, warnings
        warnings.simplefilter("default")  # every warning once per location, as a plain python run shows them
        from yolo_prune_plugin.cli import main
        rc = main({args!r})
        warnings.warn("unrelated warning still shown", FutureWarning)  # only the plugin's targets are silenced
        sys.exit(rc)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "YOLOV5_CONFIG_DIR": str(home)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(ROOT),
                       timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "torch.cuda.amp" not in log, [ln for ln in log.splitlines() if "torch.cuda.amp" in ln]
    assert "Arial.ttf" not in log
    assert "unrelated warning still shown" in log
    run = tmp_path / "runs" / "exp"
    w = run / "weights"
    assert _sparsity(w / "best.pt") < 0.01 and _sparsity(w / "last.pt") < 0.01  # training outputs untouched
    for name in ("best_pruned.pt", "last_pruned.pt"):
        assert abs(_sparsity(w / name) - 0.3) <= 0.001
        ckpt = torch.load(w / name)
        assert ckpt["ema"] is None and ckpt["prune"]["metrics_after"] is not None
        assert backend.attempt_load(w / name, "cpu").nc == 3
    report = json.loads((run / "prune_report.json").read_text())
    best_entry = report["results"][0]
    assert best_entry["checkpoint"] == str(w / "best.pt")
    assert set(best_entry["metrics_before"]) >= {"P", "R", "mAP50", "mAP50-95"}
    assert best_entry["eval"] == {"imgsz": 64, "batch_size": 8, "iou_thres": 0.6, "half": False}
    # YOLOv5's own validator on the pruned file reproduces the reported numbers
    with driving_yolov5(backend):  # YOLOv5 called directly: offline font etc.
        results = backend.val.run(data=str(tiny_data), weights=str(w / "best_pruned.pt"), imgsz=64, batch_size=8,
                                  iou_thres=0.6, device="cpu", workers=0, project=str(tmp_path / "val"), plots=False)[0]
    assert abs(results[3] - best_entry["metrics_after"]["mAP50-95"]) < 0.002


def test_api_train_with_yaml_config(backend, tiny_data, tmp_path):
    from yolo_prune_plugin import train

    cfg = tmp_path / "prune.yaml"
    cfg.write_text("amount: 0.5\nmethod: lamp\nexclude: ['model.24.*']\nevaluate: false\n")
    o = TINY.train_overrides(tiny_data, tmp_path / "runs", "exp", yolov5_root=backend.root)
    plugin = train(prune=cfg, **o)
    assert plugin.error is None and plugin.ran
    entry = plugin.entries[0]
    assert entry.method == "lamp" and abs(entry.sparsity_after["sparsity"] - 0.5) < 1e-3
    assert all(not layer["name"].startswith("model.24.") for layer in entry.sparsity_after["layers"])


@pytest.mark.parametrize("flags, hooked", [([], False), (["--prune-amount", "0.3"], True)])
def test_train_without_prune_flags_is_plain_yolov5(backend, tiny_data, tmp_path, monkeypatch, small_model, flags,
                                                   hooked):
    """Without a --prune-* flag `yolo-prune train` hands YOLOv5 callbacks with no hook of the plugin and nothing is
    pruned; with one (the control) the plugin's hooks are there and the run is pruned."""
    seen = {}
    fake = fake_train_main(small_model)

    def main_spy(opt, callbacks):
        seen["hooks"] = sorted({k for k, actions in callbacks._callbacks.items() for a in actions
                                if a["name"] == HOOK_NAME})
        return fake(opt, callbacks)

    monkeypatch.setattr(backend.train, "main", main_spy)
    assert main(_train_args(backend, tiny_data, tmp_path / "runs", *flags)) == 0
    run = tmp_path / "runs" / "exp"
    assert (run / "weights" / "best.pt").exists()
    assert ("on_train_end" in seen["hooks"]) is hooked and bool(seen["hooks"]) is hooked
    assert (run / "prune_report.json").exists() is hooked and bool(list(run.rglob("*_pruned.pt"))) is hooked


@pytest.mark.parametrize("target, said", [  # inside the pipeline / outside it (reading the run's options)
    ("prune_model", "{best}: pruning failed (RuntimeError: injected pruning fault)"),
    ("context_from_opt", "{best}: RuntimeError: injected pruning fault\n  Your training outputs")])
def test_failure_at_train_end_exits_nonzero_and_keeps_outputs(backend, tiny_data, tmp_path, monkeypatch, caplog,
                                                              small_model, target, said):
    import yolo_prune_plugin.pipeline as pipeline_mod
    import yolo_prune_plugin.stages as stages_mod

    def boom(*a, **k):
        raise RuntimeError("injected pruning fault\nsecond line")

    monkeypatch.setattr(stages_mod if target == "prune_model" else pipeline_mod, target, boom)
    monkeypatch.setattr(backend.train, "main", fake_train_main(small_model))
    rc = main(_train_args(backend, tiny_data, tmp_path / "runs", "--prune-amount", "0.3"))
    assert rc == 1
    w = tmp_path / "runs" / "exp" / "weights"
    assert (w / "best.pt").exists() and (w / "last.pt").exists() and _sparsity(w / "best.pt") < 0.01
    assert not list(w.glob("*_pruned.pt")) and not list(w.glob(".*.tmp"))
    assert "injected pruning fault" in caplog.text and "yolo-prune prune --config " in caplog.text
    assert f"--weights {w / 'best.pt'}" in caplog.text
    assert "failed: " + said.format(best=w / "best.pt") in caplog.text and "second line" not in caplog.text


def test_train_structure_flag_reaches_the_hook(backend, tiny_data, tmp_path, monkeypatch, tiny_model):
    """`--prune-structure channel --prune-bench`: channels removed at train end and timed into the report."""
    monkeypatch.setattr(backend.train, "main", fake_train_main(tiny_model))
    rc = main(_train_args(backend, tiny_data, tmp_path / "runs", "--prune-amount", "0.3", "--prune-structure",
                          "channel", "--prune-bench"))
    assert rc == 0
    entry = json.loads((tmp_path / "runs" / "exp" / "prune_report.json").read_text())["results"][0]
    assert entry["structure"] == "channel" and abs(entry["channels"]["achieved"] - 0.3) <= 0.02
    assert [r["file"].rsplit("/", 1)[-1] for r in entry["bench"]] == ["best.pt", "best_pruned.pt"]
    assert entry["bench"][1]["params"] < entry["bench"][0]["params"]
    # the same timing run also took the dense model at --img 32: what resizing alone gives, on the same val images
    rb = entry["resize_baseline"]
    assert [p["imgsz"] for p in rb["sizes"]] == [32] and rb["imgsz"] == 32 and rb["runtime"] == "onnxruntime"
    assert rb["pruned_speedup"] == entry["bench"][1]["onnxruntime_speedup"]
    assert rb["as_fast"] == (rb["speedup"] >= rb["pruned_speedup"])
    from yolo_prune_plugin.backend.evaluation import evaluate_weights, make_settings

    dense_at_32 = evaluate_weights(tmp_path / "runs" / "exp" / "weights" / "best.pt",
                                   make_settings(tiny_data, 32, 8, "cpu", workers=0, backend=backend), backend=backend)
    assert rb["metrics"]["mAP50-95"] == pytest.approx(dense_at_32.map, abs=1e-6)
