"""Fine-tuning an existing checkpoint: `yolo-prune prune --finetune-epochs N` and `api.prune(finetune=...)`.

Real ``train.main`` runs on the synthetic dataset (4 train / 2 val images at 64 px) with a narrow YOLOv5n, one
epoch: what is checked is that the same pipeline, report and checks as the train-end fine-tune run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from yolo_prune_plugin import api
from yolo_prune_plugin.backend.loading import load_checkpoint
from yolo_prune_plugin.cli import main
from yolo_prune_plugin.errors import ConfigError
from yolo_prune_plugin.training import finetune as F, masks as M
from yolo_prune_plugin.api import run_training, train_opt
from yolo_prune_plugin.config import config_from_dict
from yolo_prune_plugin.prune.unstructured import conv_layers, sparsity_stats
from yolo_prune_plugin.report import validate_report
from yolo_prune_plugin.training.finetune import checkpoint_train_options

from testkit import assert_plain_yolov5, assert_yolov5_restored, save_checkpoint, tiny_train_opt

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
    """One channel prune + 1-epoch fine-tune through the pipeline (``api.prune``), with distillation from the dense
    model: no saved ``opt``, so YOLOv5's defaults (hyp.scratch-low, batch 16 unless given) with the call's batch
    and size; the pruned architecture is what YOLOv5 trained and what is written (the same channel counts as the
    fine-tune's best.pt, not the dense ones); the teacher's output and feature terms ran on every batch."""
    from yolo_prune_plugin.prune.unstructured import conv_layers

    def channels(model):
        return [(m.out_channels, m.in_channels) for _, m in conv_layers(model)]

    w = save_checkpoint(tiny_model, tmp_path / "model.pt")
    [e] = api.prune(w, tiny_data, imgsz=64, batch_size=2, device="cpu", workers=0, structure="channel", amount=0.3,
                    finetune={"epochs": 1, "distill": True, "distill_features": 0.5}, channel={"reconstruct": False})
    # (reconstruction off: on these 64-px train images it fits the student to the teacher's outputs exactly)
    assert e.mode == "finetune" and e.structure == "channel"
    assert e.finetune["epochs"] == 1 and Path(e.finetune["run"]).name == "model_finetune"
    used = yaml.safe_load((Path(e.finetune["run"]) / "opt.yaml").read_text())
    assert used["batch_size"] == 2 and used["imgsz"] == 64
    d = e.finetune["distill"]
    assert d["weight"] == 1.0 and d["batches"] == 2 and e.finetune["history"][0]["loss_teacher"] > 0
    assert d["features"] == 0.5 and e.finetune["history"][0]["loss_feature"] > 0 and len(d["feature_matched_by"]) == 3
    final = load_checkpoint(tmp_path / "model_pruned.pt")["model"]
    ft_best = torch.load(Path(e.finetune["run"]) / "weights" / "best.pt")["model"]
    assert channels(final) == channels(ft_best) != channels(tiny_model)
    weights = [sum(m.weight.numel() for _, m in conv_layers(x)) for x in (final, tiny_model)]
    assert abs(1 - weights[0] / weights[1] - 0.3) <= 0.02 and e.metrics_after is not None


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


def test_finetune_keeps_every_pruned_position_zero(backend, tiny_data, tiny_cfg, tmp_path, monkeypatch):
    """`yolo-prune train --prune-finetune-epochs 1`: train, prune best.pt, then fine-tune after train.main returns."""
    opt = tiny_train_opt(backend, tiny_data, tiny_cfg, tmp_path, "exp")
    seen = {}
    real = F.finetune_checkpoint

    def spy(weights, *args, **kwargs):  # the one-shot file and the live training objects, before they go
        seen["oneshot"] = load_checkpoint(weights)["model"].float()
        seen["masks"] = M.zero_masks(seen["oneshot"])
        res = real(weights, *args, **kwargs)
        seen["live"] = (M.count_leaks(res.model, seen["masks"]), M.count_leaks(res.ema_model, seen["masks"]))
        return res

    monkeypatch.setattr(F, "finetune_checkpoint", spy)
    cfg = config_from_dict({"amount": 0.5, "finetune": {"epochs": 1}})
    plugin = run_training(opt, cfg, backend)
    assert plugin.mode == "finetune" and plugin.error is None and plugin.ran
    run = Path(opt.save_dir)
    w = run / "weights"
    assert_yolov5_restored(backend)
    masks = seen["masks"]
    total = sparsity_stats(seen["oneshot"]).weights
    assert M.count_masked(masks) == round(0.5 * total)
    assert seen["live"] == (0, 0)  # live model and EMA at the end of the fine-tune

    ft_run = tmp_path / "exp_finetune"
    for f in ("last.pt", "best.pt"):  # every file the fine-tune run saved
        assert M.file_leaks(ft_run / "weights" / f, masks) == {"model": 0}
    final = torch.load(w / "best_pruned.pt")  # weights_only: plain YOLOv5 classes only
    assert final["ema"] is None and final["optimizer"] is None
    model = final["model"]
    assert next(model.parameters()).dtype == torch.float16
    assert_plain_yolov5(model)
    zeros = M.zero_masks(model)
    assert all(torch.equal(zeros[n], masks[n]) for n in masks)  # exactly the one-shot positions, nothing more
    ft_best = load_checkpoint(ft_run / "weights" / "best.pt")["model"]  # it is the fine-tuned model ...
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ft_best.state_dict().values()))
    changed = sum(int((m.weight.float() != seen["oneshot"].get_submodule(n).weight)[~masks[n]].sum())
                  for n, m in conv_layers(model))
    assert changed > 0.01 * (total - M.count_masked(masks))  # ... not the one-shot one (1 step, fp16 EMA)

    info = final["prune"]
    ft = info["finetune"]
    assert ft["run"] == str(ft_run) and ft["masked_weights"] == M.count_masked(masks)
    assert set(info["leaks"].values()) == {0} and {"live_model", "live_ema", "best_pruned.pt"} <= set(info["leaks"])
    assert [h["epoch"] for h in ft["history"]] == [0] and ft["history"][0]["sparsity"] == 0.5
    assert ft["history"][0]["lr"] == pytest.approx([0.001] * 3)  # lr0 0.01 x lr_scale 0.1, warmup replaced
    assert yaml.safe_load((run / "hyp_finetune.yaml").read_text())["lr0"] == pytest.approx(0.001)
    assert info["metrics_oneshot"] is not None and info["metrics_after"] is not None
    # every "after" number comes from the plugin's own validation, without YOLOv5's NMS time limit (not from
    # YOLOv5's final validation of the fine-tune run, which runs with it)
    assert info["metrics_after"]["nms_time_limit"] == info["metrics_oneshot"]["nms_time_limit"] == "lifted"
    report = json.loads((run / "prune_report.json").read_text())
    assert report["mode"] == "finetune" and report["results"][0]["leaks"] == info["leaks"]
    validate_report(report)
    loaded = backend.attempt_load(w / "best_pruned.pt", "cpu")
    assert loaded(torch.zeros(1, 3, 64, 64))[0].shape[-1] == 8


def test_finetune_options_ignore_the_host_process_argv(backend, tiny_model, tiny_data, tiny_cfg, tmp_path,
                                                        monkeypatch):
    """A user script run with ``-h`` or its own flags: YOLOv5's train options come from the run, not sys.argv."""
    pruned = save_checkpoint(tiny_model, tmp_path / "pruned.pt")
    base = tiny_train_opt(backend, tiny_data, tiny_cfg, tmp_path, "base")
    seen = {}

    def main(opt, callbacks=None):  # YOLOv5's train.main, stopped before it trains: the options it would get
        seen["opt"] = opt
        raise _Stop

    monkeypatch.setattr(backend.train, "main", main)
    monkeypatch.setattr(sys, "argv", ["script.py", "-h", "--foo", "--epochs", "99"])
    with pytest.raises(_Stop):
        F.finetune_checkpoint(pruned, base, 2, lr_scale=0.5, masks=None, project=tmp_path, name="ft", backend=backend)
    opt = seen["opt"]
    assert opt.epochs == 2 and opt.data == base.data and opt.weights == str(pruned.resolve())
    assert sys.argv == ["script.py", "-h", "--foo", "--epochs", "99"]  # left as the host had it
    with pytest.raises(ConfigError, match="unknown YOLOv5 train option 'foo'"):  # the api's helper: the same one
        train_opt([], backend, foo=1)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("keep,schedule", [("last", "cosine"), ("best", "linear"), ("auto", "run")])
def test_the_written_file_holds_the_weights_the_report_names(backend, tiny_model, tiny_data, tmp_path, keep,
                                                               schedule):
    """``finetune.keep`` and ``finetune.lr_schedule`` through ``api.prune``: the report's ``finetune.kept`` names the
    file and epoch (``best``: the epoch of highest fitness in the history), the pruned file holds exactly that
    file's weights, and YOLOv5 ran with the schedule asked for (``cos_lr``; the per-epoch lr follows it)."""
    w = save_checkpoint(tiny_model, tmp_path / "model.pt")
    [e] = api.prune(w, tiny_data, imgsz=64, batch_size=2, device="cpu", workers=0, structure="channel", amount=0.3,
                    finetune={"epochs": 3, "keep": keep, "lr_schedule": schedule, "lr_scale": 5.0},
                    channel={"reconstruct": False}, bn_recalibration={"images": 0})
    ft = e.finetune
    kept, run = ft["kept"], Path(ft["run"])
    fitness = {r["epoch"]: r["fitness"] for r in ft["history"]}
    assert kept["rule"] == keep and kept["last_epoch"] == 2 and fitness[kept["best_epoch"]] == max(fitness.values())
    file = "last.pt" if keep == "auto" else f"{keep}.pt"  # auto: 2 val images are too few to pick by
    assert kept["file"] == file and Path(ft["source"]) == run / "weights" / file
    assert kept["epoch"] == (kept["best_epoch"] if keep == "best" else 2) and ft["lr_schedule"] == schedule
    if keep == "auto":
        assert "the val split has 2 images" in kept["why"] or kept["why"] == "best.pt is the last epoch"
    assert yaml.safe_load((run / "opt.yaml").read_text())["cos_lr"] is (schedule == "cosine")
    lrs = [r["lr"][0] for r in ft["history"]]
    assert lrs[-1] < lrs[0]  # decays in both schedules (YOLOv5's lambda of the epoch)
    written = load_checkpoint(tmp_path / "model_pruned.pt")["model"].float().state_dict()
    source = torch.load(run / "weights" / kept["file"], weights_only=False)
    source = (source.get("ema") or source["model"]).float().state_dict()
    assert written.keys() == source.keys()
    assert all(torch.allclose(written[k].float(), source[k].float(), atol=1e-3) for k in written)


@pytest.mark.parametrize("data,match", [
    ({"finetune": {"epochs": 2, "keep": "median"}}, "'finetune.keep' must be one of auto, last, best"),
    ({"finetune": {"epochs": 2, "lr_schedule": "onecycle"}}, "'finetune.lr_schedule' must be one of run, linear, "
     "cosine"),
])
def test_bad_keep_and_schedule_are_one_line_errors(data, match):
    with pytest.raises(ConfigError, match=match) as e:
        config_from_dict(data)
    assert "\n" not in str(e.value)
