"""Fine-tuning an existing checkpoint: `yolo-prune prune --finetune-epochs N` and `api.prune(finetune=...)`.

Real ``train.main`` runs on the synthetic dataset (4 train / 2 val images at 64 px) with a narrow YOLOv5n, one
epoch: what is checked is that the same pipeline, report and checks as the train-end fine-tune run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from yolo_prune_plugin import api
from yolo_prune_plugin.backend.loading import load_checkpoint
from yolo_prune_plugin.cli import main
from yolo_prune_plugin.errors import ConfigError
from yolo_prune_plugin.training import masks as M
from yolo_prune_plugin.training.finetune import checkpoint_train_options

from testkit import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _saved_opt(backend) -> dict:
    """What YOLOv5's train.py saves as ``ckpt['opt']``: ``vars(opt)`` with ``hyp`` as a dict."""
    hyp = yaml.safe_load((Path(backend.root) / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())
    return {"batch_size": 4, "epochs": 300, "imgsz": 640, "optimizer": "SGD", "cos_lr": False, "hyp": hyp,
            "noplots": True, "seed": 0, "device": "0", "workers": 8, "data": "/gone/data.yaml",
            "weights": "/gone/yolov5n.pt", "project": "/gone/runs", "name": "exp"}


def test_cli_prune_finetunes_an_existing_checkpoint(backend, tiny_model, tiny_data, tmp_path):
    """The checkpoint's saved options, the command's data/image size/device; the train-end path's report."""
    w = save_checkpoint(tiny_model, tmp_path / "best.pt", opt=_saved_opt(backend))
    rc = main(["prune", "--weights", str(w), "--data", str(tiny_data), "--img", "64", "--device", "cpu",
               "--workers", "0", "--amount", "0.5", "--method", "global", "--finetune-epochs", "1"])
    assert rc == 0
    ft_run = tmp_path / "best_finetune"  # beside the weights, not in the checkpoint's old project
    assert (ft_run / "weights" / "last.pt").is_file()
    used = yaml.safe_load((ft_run / "opt.yaml").read_text())
    assert used["batch_size"] == 4 and used["imgsz"] == 64 and used["device"] == "cpu" and used["epochs"] == 1
    assert used["data"] == str(tiny_data.resolve()) and used["noplots"] is True
    assert yaml.safe_load((ft_run / "hyp.yaml").read_text())["lr0"] == pytest.approx(0.001)  # lr_scale 0.1
    final = torch.load(tmp_path / "best_pruned.pt")
    info = final["prune"]
    assert info["mode"] == "finetune" and info["finetune"]["run"] == str(ft_run)
    assert set(info["leaks"].values()) == {0}
    assert info["metrics_oneshot"] is not None and info["metrics_after"] is not None
    masks = M.zero_masks(final["model"])
    assert M.count_masked(masks) >= info["finetune"]["masked_weights"] > 0
    report = json.loads((tmp_path / "prune_report.json").read_text())
    assert report["mode"] == "finetune" and report["results"][0]["finetune"]["epochs"] == 1


def test_api_prune_finetunes_a_channel_pruned_checkpoint_without_saved_options(backend, tiny_model, tiny_data,
                                                                               tmp_path):
    """No saved ``opt``: YOLOv5's defaults (hyp.scratch-low, batch 16 unless given); the pruned architecture kept."""
    w = save_checkpoint(tiny_model, tmp_path / "model.pt")
    entries = api.prune(w, tiny_data, imgsz=64, batch_size=4, device="cpu", workers=0, structure="channel",
                        amount=0.3, finetune={"epochs": 1})
    e = entries[0]
    assert e.finetune["epochs"] == 1 and Path(e.finetune["run"]).name == "model_finetune"
    used = yaml.safe_load((Path(e.finetune["run"]) / "opt.yaml").read_text())
    assert used["batch_size"] == 4 and used["imgsz"] == 64
    pruned = load_checkpoint(tmp_path / "model_pruned.pt")["model"]
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in tiny_model.parameters())
    assert e.metrics_after is not None


def test_checkpoint_train_options_take_the_run_and_the_flags(backend, tmp_path):
    opt = checkpoint_train_options({"opt": _saved_opt(backend)}, tmp_path / "d.yaml", 416, None, "cpu", 2, False)
    assert opt["batch_size"] == 4 and opt["imgsz"] == 416 and opt["device"] == "cpu" and opt["workers"] == 2
    assert opt["hyp"]["lr0"] == 0.01 and opt["data"] == str((tmp_path / "d.yaml").resolve())
    assert checkpoint_train_options({"opt": None}, tmp_path / "d.yaml", 64, 8, "", 0, True)["batch_size"] == 8
    assert checkpoint_train_options({}, tmp_path / "d.yaml", 64, None, "", 0, True)["batch_size"] == 16


@pytest.mark.parametrize("data,cfg,match", [
    (None, {"finetune": {"epochs": 1}}, "finetune.epochs.*pass --data"),
    ("tiny", {"schedule": {"final_amount": 0.5, "end_epoch": 1}}, "schedule.*yolo-prune train"),
])
def test_prune_refuses_what_it_cannot_do_before_any_work(backend, tiny_model, tiny_data, tmp_path, data, cfg, match):
    w = save_checkpoint(tiny_model, tmp_path / "best.pt")
    with pytest.raises(ConfigError, match=match):
        api.prune(w, tiny_data if data else None, imgsz=64, device="cpu", workers=0, **cfg)
    assert not (tmp_path / "best_pruned.pt").exists()


# ---------------------------------------------------------------------------------------------------
# warm-up and accumulation inside YOLOv5's loop
# ---------------------------------------------------------------------------------------------------
def _train_opt(backend, data, cfg, project, name, batch_size):
    return api.train_opt([], backend, data=str(data), cfg=str(cfg), weights="", imgsz=64, batch_size=batch_size,
                         device="cpu", workers=0, noplots=True, noautoanchor=True, project=str(project), name=name)


@pytest.mark.parametrize("warmup", [False, True])
def test_finetune_steps_every_batch_at_the_finetune_lr(backend, tiny_model, tiny_data, tiny_cfg, tmp_path, warmup):
    """Batch 1 on 4 images: YOLOv5 would ramp ``accumulate`` from 1 towards 64 during its >= 100-iteration warm-up
    (2 optimizer steps in 4 batches, lr rising from 0); the plugin's fine-tune steps on every batch at lr0 x 0.1."""
    from yolo_prune_plugin.training.finetune import finetune_checkpoint

    w = save_checkpoint(tiny_model, tmp_path / "dense.pt")
    res = finetune_checkpoint(w, _train_opt(backend, tiny_data, tiny_cfg, tmp_path, "base", 1), 2, masks=None,
                              warmup=warmup, project=tmp_path, name="ft", backend=backend)
    steps = [r["optimizer_steps"] for r in res.history]
    lo_hi = [r["step_lr"] for r in res.history]
    if warmup:  # the control: YOLOv5's own warm-up and accumulation
        assert steps[0] < 4 and lo_hi[0][0] < 0.001 and res.loop["ema_updates"] == sum(steps)
        return
    assert steps == [4, 4]  # one optimizer step per batch from the first batch
    # every group at lr0 x lr_scale from the first step; YOLOv5's scheduler (last_epoch = start_epoch - 1) gives
    # epoch e the factor lf(e - 1), so epoch 1 also runs at lr0 x 0.1
    assert lo_hi == [pytest.approx([0.001, 0.001])] * 2
    assert [r["lr"] for r in res.history] == [pytest.approx([0.001] * 3)] * 2
    assert res.loop == {"warmup_iterations": 0, "accumulate": 1, "yolov5_warmup_iterations": 100,
                        "yolov5_accumulate": 64, "ema_updates": 8}
    sgd = yaml.safe_load((res.save_dir / "hyp.yaml").read_text())["weight_decay"]
    assert sgd == pytest.approx(0.0005)  # the hyp as YOLOv5 saved it; per-step decay is divided in the optimizer
