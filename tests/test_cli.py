"""cli.py: `yolo-prune prune/train` exit codes and messages; bad input rejected before any training."""

from __future__ import annotations

import json

import pytest
import torch

from yolo_prune_plugin.backend.patches import driving_yolov5
from yolo_prune_plugin.cli import main
from yolo_prune_plugin.prune.unstructured import conv_layers


@pytest.fixture(scope="module")
def synthetic_yaml(tmp_path_factory):
    """The project's own tiny dataset (3 classes, like ``small_ckpt``): no shared data needed."""
    from yolo_prune_plugin.tools.synthetic import TINY, make_dataset

    return make_dataset(tmp_path_factory.mktemp("synthetic"), **TINY.dataset_kwargs())


def test_prune_without_data_writes_exact_sparsity(backend, small_ckpt, capsys):
    rc = main(["prune", "--weights", str(small_ckpt), "--amount", "0.35", "--device", "cpu"])
    assert rc == 0
    out = small_ckpt.with_name("best_pruned.pt")
    ckpt = torch.load(out)
    layers = conv_layers(ckpt["model"])
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    total = sum(m.weight.numel() for _, m in layers)
    assert zeros == round(0.35 * total)
    assert "Conv2d sparsity" in capsys.readouterr().out
    report = json.loads((small_ckpt.parent / "prune_report.json").read_text())
    assert report["results"][0]["metrics_after"] is None  # no --data: nothing evaluated


def test_prune_with_data_matches_yolov5_val(backend, coco8_yaml, shared, tmp_path):
    import shutil

    w = tmp_path / "yolov5n.pt"
    shutil.copy(shared / "weights" / "yolov5n.pt", w)
    rc = main(["prune", "--weights", str(w), "--data", str(coco8_yaml), "--img", "160", "--amount", "0.3",
               "--device", "cpu", "--workers", "0"])
    assert rc == 0
    entry = json.loads((tmp_path / "prune_report.json").read_text())["results"][0]
    assert entry["metrics_before"]["mAP50-95"] > 0 and entry["metrics_after"]["mAP50-95"] > 0
    # YOLOv5's own standalone validator on the written file reproduces the reported numbers
    with driving_yolov5(backend):  # YOLOv5 called directly: offline font etc.
        results = backend.val.run(data=str(coco8_yaml), weights=str(tmp_path / "yolov5n_pruned.pt"), imgsz=160,
                                  batch_size=32, iou_thres=0.6, device="cpu", workers=0, project=str(tmp_path / "val"),
                                  plots=False)[0]
    assert abs(results[3] - entry["metrics_after"]["mAP50-95"]) < 0.002
    assert abs(results[2] - entry["metrics_after"]["mAP50"]) < 0.002


@pytest.mark.parametrize("args,match", [
    (["--amount", "1.5"], "--amount: 'amount' must satisfy 0 <= amount < 1"),
    (["--method", "l2"], "--method: 'method' must be one of"),
    (["--include", "model.99.*"], "'include' pattern 'model.99.\\*' matches no Conv2d"),
])
def test_prune_bad_options_exit_2(small_ckpt, capsys, args, match):
    import re

    rc = main(["prune", "--weights", str(small_ckpt), *args])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(match, err), err
    assert "Traceback" not in err
    assert not small_ckpt.with_name("best_pruned.pt").exists()


def test_prune_bad_file_exit_1(tmp_path, capsys):
    f = tmp_path / "x.pt"
    f.write_bytes(b"not a checkpoint")
    assert main(["prune", "--weights", str(f)]) == 1
    err = capsys.readouterr().err
    assert f"{f}: corrupted" in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("extra,match,code", [
    (["--prune-amount", "1.5"], "--prune-amount: 'amount' must satisfy 0 <= amount < 1", 2),
    (["--prune-config", "{cfg}"], "unknown key 'ammount'; did you mean 'amount'", 2),
    (["--prune-amount", "0.3", "--prune-exclude", "nope.*"], "'exclude' pattern 'nope.\\*' matches no Conv2d", 2),
    (["--prune-amount", "0.3", "--data", "{tmp}/missing.yaml"], "missing.yaml: data YAML not found", 2),
    (["--prune-amount", "0.3", "--evolve", "3"], "--evolve", 2),
    (["--prune-amount", "0.3", "--prune-config", "{sched}"], "sched.yaml: 'schedule.final_amount' is missing", 2),
])
def test_train_rejects_bad_input_before_any_epoch(small_ckpt, synthetic_yaml, tmp_path, capsys, extra, match, code):
    import re

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("ammount: 0.3\n")
    sched = tmp_path / "sched.yaml"  # a schedule section without final_amount: an error, not silently one-shot
    sched.write_text("schedule: {start_epoch: 0, end_epoch: 0}\n")
    extra = [e.format(cfg=cfg, tmp=tmp_path, sched=sched) for e in extra]
    args = ["train", "--data", str(synthetic_yaml), "--weights", str(small_ckpt), "--img", "64", "--epochs", "1",
            "--device", "cpu", "--project", str(tmp_path / "runs"), *extra]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == code and re.search(match, err), err
    assert not (tmp_path / "runs").exists()  # YOLOv5 never started


def test_prune_and_export_in_one_go(backend, small_ckpt, capsys):
    rc = main(["prune", "--weights", str(small_ckpt), "--amount", "0.5", "--device", "cpu", "--img", "64",
               "--export", "onnx,torchscript"])
    assert rc == 0, capsys.readouterr().err
    entry = json.loads((small_ckpt.parent / "prune_report.json").read_text())["results"][0]
    arts = {a["format"]: a for a in entry["exports"]}
    assert set(arts) == {"onnx", "torchscript"}
    for a in arts.values():
        assert a["ok"] and a["zeros"] == a["expected_zeros"] > 0 and a["max_abs_diff"] <= 1e-3
        assert 0 < a["gzip_bytes"] < a["bytes"]
    assert (small_ckpt.parent / "best_pruned.onnx").is_file() and (small_ckpt.parent / "best_pruned.torchscript").is_file()
    assert "onnx bytes (gzip)" in capsys.readouterr().out


def test_export_command_on_existing_checkpoint(backend, small_model, tmp_path, capsys):
    """`yolo-prune export` on a pruned checkpoint: the TorchScript file is written beside it, holds its zeros and
    its outputs, the printed line says so; a second export without --overwrite is refused and changes nothing."""
    from yolo_prune_plugin.prune.unstructured import prune_model

    from testkit import save_checkpoint

    prune_model(small_model, 0.5, log=False)
    weights = save_checkpoint(small_model, tmp_path / "best_pruned.pt")
    zeros = sum(int((m.weight == 0).sum()) for _, m in conv_layers(torch.load(weights)["model"]))
    rc = main(["export", "--weights", str(weights), "--include", "torchscript", "--img", "64"])
    out = capsys.readouterr().out
    ts = tmp_path / "best_pruned.torchscript"
    assert rc == 0 and ts.is_file(), out
    line = next(ln for ln in out.splitlines() if ln.startswith("torchscript"))
    assert f"OK  {ts}" in line and f"zeros {zeros}/{zeros}" in line and zeros > 0
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ref = backend.attempt_load(weights, "cpu").eval()(x)[0]
    got = torch.jit.load(str(ts))(x)[0]
    assert torch.allclose(got, ref, atol=1e-3)  # what the artefact computes is the checkpoint's model
    before = ts.read_bytes()
    assert main(["export", "--weights", str(weights), "--include", "torchscript", "--img", "64"]) != 0
    assert "already exist" in capsys.readouterr().err and ts.read_bytes() == before


def test_unknown_export_format_rejected_before_pruning(small_ckpt, capsys):
    rc = main(["prune", "--weights", str(small_ckpt), "--amount", "0.5", "--export", "onnx,pdf"])
    assert rc == 2 and "pdf" in capsys.readouterr().err
    assert not small_ckpt.with_name("best_pruned.pt").exists()


def test_cli_run_leaves_process_state_as_it_was(backend, small_ckpt, monkeypatch):
    """After a command: numpy, Pillow, YOLOv5's train.*/check_font, sys.path, environment and log handlers are
    as before (only backend.patches.PROCESS_WIDE stays)."""
    import logging
    import os
    import sys

    import numpy as np
    from PIL import ImageFont

    monkeypatch.delattr(np, "trapz", raising=False)  # as on numpy >= 2.4, so the shim is really applied

    def state():
        return (getattr(np, "trapz", None), ImageFont.FreeTypeFont.__dict__.get("getsize"),
                backend.general.check_font, dict(vars(backend.train)), list(sys.path), dict(os.environ),
                list(logging.getLogger("yolo_prune_plugin").handlers), logging.getLogger("yolo_prune_plugin").level)

    before = state()
    assert main(["prune", "--weights", str(small_ckpt), "--amount", "0.2", "--trust-checkpoint"]) == 0
    assert small_ckpt.with_name("best_pruned.pt").is_file()
    assert state() == before
