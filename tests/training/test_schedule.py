"""training/ (finetune, masks, schedule): masked fine-tuning after pruning and gradual pruning, inside YOLOv5's real training loop.

Real ``train.main`` runs use the synthetic dataset (4 train / 2 val images at 64 px) and a narrow YOLOv5n
(width 0.125) so that each run takes seconds; their mAP is meaningless, the zeros are what is checked.
"""

from __future__ import annotations

import copy
import gc
import importlib
import json
import math
import sys
import weakref
from pathlib import Path

import pytest
import torch
import yaml

from yolo_prune_plugin.training import finetune as F, masks as M, schedule as S
from yolo_prune_plugin.backend.loading import load_checkpoint
from yolo_prune_plugin.api import run_training, train_opt
from yolo_prune_plugin.callbacks import register
from yolo_prune_plugin.config import ScheduleOptions, config_from_dict
from yolo_prune_plugin.errors import ConfigError, PruneError
from yolo_prune_plugin.prune.unstructured import conv_layers, prune_model, sparsity_stats
from yolo_prune_plugin.report import validate_report

from testkit import save_checkpoint


# ---------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models




def _opt(backend, data, cfg, project, name, epochs=1):
    return train_opt([], backend, data=str(data), cfg=str(cfg), weights="", imgsz=64, epochs=epochs, batch_size=4,
                     device="cpu", workers=0, noplots=True, noautoanchor=True, project=str(project), name=name)


def _torch_utils(backend):
    return importlib.import_module(backend.prefix + "utils.torch_utils")


def _assert_yolov5_restored(backend):
    tu = _torch_utils(backend)
    assert backend.train.smart_optimizer is tu.smart_optimizer
    assert backend.train.ModelEMA is tu.ModelEMA and backend.train.smart_resume is tu.smart_resume


def _assert_plain_yolov5(model):
    """No pruning re-parametrisation and no hooks travel with a saved model."""
    keys = list(model.state_dict())
    assert not [k for k in keys if k.endswith(("_orig", "_mask"))]
    assert not any(m._forward_pre_hooks or m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(p._backward_hooks for p in model.parameters() if getattr(p, "_backward_hooks", None))


# ---------------------------------------------------------------------------------------------------
# schedule arithmetic
# ---------------------------------------------------------------------------------------------------
def _cubic(e, start, end, final):  # independent restatement of Zhu & Gupta (2017)
    if e < start:
        return 0.0
    if e >= end:
        return final
    return final + (0.0 - final) * (1 - (e - start) / (end - start)) ** 3


@pytest.mark.parametrize("start,end,every,final,expected", [
    (0, 2, 1, 0.5, [0.0, 0.4375, 0.5, 0.5, 0.5]),
    (1, 5, 2, 0.8, [0.0, 0.0, 0.0, 0.7, 0.7, 0.8, 0.8]),       # steps at 1, 3 and the end 5
    (0, 4, 3, 0.6, [0.0, 0.0, 0.0, 0.6 * (1 - (1 / 4) ** 3), 0.6, 0.6]),  # steps at 0, 3 and the end 4
    (3, 3, 1, 0.6, [0.0, 0.0, 0.0, 0.6, 0.6]),                  # start == end: one step to the final value
])
def test_schedule_amount_follows_cubic_steps(start, end, every, final, expected):
    s = ScheduleOptions(start_epoch=start, end_epoch=end, final_amount=final, every=every)
    got = [S.schedule_amount(e, s) for e in range(len(expected))]
    assert got == pytest.approx(expected, abs=1e-12)
    steps = [e for e in range(len(expected)) if S.is_step_epoch(e, s)]
    assert steps == sorted({*range(start, end + 1, every), end})
    for e in steps:  # at a step the value is the cubic itself
        assert S.schedule_amount(e, s) == pytest.approx(_cubic(e, start, end, final), abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# the optimizer hooks on YOLOv5's own optimizer and EMA
# ---------------------------------------------------------------------------------------------------
def _loss(model):
    out = model(torch.rand(2, 3, 32, 32))  # BatchNorm needs 2 values per channel at P5 (1x1)
    return sum(o.float().pow(2).mean() for o in out)


@pytest.mark.parametrize("name,scaler", [("SGD", True), ("Adam", False), ("AdamW", False)])
def test_mask_keeper_holds_zeros_in_model_ema_and_optimizer_state(backend, tiny_model, name, scaler):
    model = tiny_model.train()
    keeper = M.MaskKeeper(backend)
    optimizer = backend.train.smart_optimizer(model, name, 0.01, 0.9, 5e-4)
    ema = backend.train.ModelEMA(model)

    def train(model, optimizer, ema, start_epoch=0):  # stands in for YOLOv5's train(): its locals are read
        keeper.capture()

    train(model, optimizer, ema)
    _assert_yolov5_restored(backend)
    assert keeper.optimizer is optimizer and keeper.model is model and keeper.ema is ema
    grad_scaler = torch.amp.GradScaler("cpu", enabled=scaler)

    def step(n):
        for _ in range(n):
            keeper.epoch_start()
            grad_scaler.scale(_loss(model)).backward()
            grad_scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
            grad_scaler.step(optimizer)
            grad_scaler.update()
            optimizer.zero_grad()
            ema.update(model)

    step(1)  # a dense step first: momentum / Adam moments are non-zero everywhere
    prune_model(model, 0.5, "global", log=False)
    keeper.set_masks(M.zero_masks(model))
    masks = keeper.masks
    assert M.count_masked(masks) == round(0.5 * sparsity_stats(model).weights)
    assert M.count_leaks(ema.ema, masks) == 0  # new mask positions zeroed in the EMA ...
    for _, m in conv_layers(model):  # ... and in the optimizer state
        for v in optimizer.state[m.weight].values():
            if torch.is_tensor(v) and v.shape == m.weight.shape:
                assert not v[masks[_].to(v.device)].any()
    snapshot = {n: m.weight.detach().clone() for n, m in conv_layers(model)}
    step(2)
    assert keeper.leaks() == {"model": 0, "ema": 0}
    moved = sum(int((m.weight.detach() != snapshot[n])[~masks[n]].sum()) for n, m in conv_layers(model))
    assert moved > 0.9 * M.count_masked(masks)  # the kept weights really trained
    saved = copy.deepcopy(ema.ema).half()  # what train.py writes into checkpoints
    _assert_plain_yolov5(saved)
    assert M.count_leaks(saved, masks) == 0

    keeper.remove_hooks()  # control: without the hooks the same steps do leak
    step(1)
    assert M.count_leaks(model, masks) > 0


# ---------------------------------------------------------------------------------------------------
# masked fine-tuning after pruning (real train.main)
# ---------------------------------------------------------------------------------------------------
def _finished_run(backend, tiny_model, tiny_data, tiny_cfg, tmp_path, name="exp"):
    run = tmp_path / name
    (run / "weights").mkdir(parents=True)
    opt = _opt(backend, tiny_data, tiny_cfg, tmp_path, name)
    opt.save_dir = str(run)
    for f in ("best.pt", "last.pt"):
        save_checkpoint(tiny_model, run / "weights" / f, opt=vars(opt))
    return run, opt


def test_finetune_keeps_every_pruned_position_zero(backend, tiny_data, tiny_cfg, tmp_path, monkeypatch):
    """`yolo-prune train --prune-finetune-epochs 1`: train, prune best.pt, then fine-tune after train.main returns."""
    opt = _opt(backend, tiny_data, tiny_cfg, tmp_path, "exp")
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
    _assert_yolov5_restored(backend)
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
    _assert_plain_yolov5(model)
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


# ---------------------------------------------------------------------------------------------------
# gradual pruning (real train.main through api.run_training, as `yolo-prune train` runs it)
# ---------------------------------------------------------------------------------------------------
def test_schedule_prunes_along_the_cubic_during_training(backend, tiny_data, tiny_cfg, tmp_path):
    s = {"start_epoch": 0, "end_epoch": 2, "every": 1, "final_amount": 0.5}
    cfg = config_from_dict({"schedule": s})
    opt = _opt(backend, tiny_data, tiny_cfg, tmp_path, "sched", epochs=3)
    plugin = run_training(opt, cfg, backend)
    assert plugin.mode == "schedule" and plugin.error is None and plugin.ran
    _assert_yolov5_restored(backend)
    sched = ScheduleOptions(**s)
    total = plugin.entries[0].sparsity_after["conv_weights"]
    # masks recomputed at epochs 1 and 2 (epoch 0's target is 0) with exactly round(s_e * total) zeros
    assert [(st["epoch"], st["zeros"]) for st in plugin.gradual.steps] == [(e, round(_cubic(e, 0, 2, 0.5) * total))
                                                                  for e in (1, 2)]
    assert [st["target"] for st in plugin.gradual.steps] == pytest.approx([0.4375, 0.5])
    for row in plugin.history:  # model and EMA at every epoch end
        want = round(S.schedule_amount(row["epoch"], sched) * total) / total
        assert row["sparsity"] == pytest.approx(want, abs=2e-6) and row["ema_sparsity"] == pytest.approx(want, abs=2e-6)
        assert set((row.get("leaked") or {0: 0}).values()) == {0} and row.get("leaked_saved", 0) == 0

    w = Path(opt.save_dir) / "weights"
    final = torch.load(w / "best_pruned.pt")
    assert final["ema"] is None and next(final["model"].parameters()).dtype == torch.float16
    _assert_plain_yolov5(final["model"])
    st = sparsity_stats(final["model"])
    assert st.zeros == round(0.5 * st.weights)  # exactly the final sparsity
    entry = final["prune"]
    assert entry["schedule"]["source_epoch"] >= 2 and set(entry["leaks"].values()) == {0}
    assert entry["metrics_after"] is not None
    last = sparsity_stats(load_checkpoint(w / "last.pt")["model"])
    assert last.zeros == st.zeros  # the final epoch's EMA is as sparse
    assert not (w / ".best_pruned_candidate.pt").exists()
    report = json.loads((Path(opt.save_dir) / "prune_report.json").read_text())
    assert report["mode"] == "schedule" and [h["epoch"] for h in report["history"]] == [0, 1, 2]
    validate_report(report)
    # "before" = epoch 0, the last epoch trained dense (the first step with a target > 0 is epoch 1), not the
    # pruned candidate validated again
    assert entry["schedule"]["dense_epoch"] == 0 and entry["metrics_before_source"].startswith("epoch 0 (dense")
    assert entry["metrics_before"]["mAP50-95"] == pytest.approx(report["history"][0]["mAP50-95"])
    assert backend.attempt_load(w / "best_pruned.pt", "cpu")(torch.zeros(1, 3, 64, 64))[0].shape[-1] == 8


@pytest.mark.parametrize("start,end,every,first", [(0, 2, 1, 1), (0, 0, 1, 0), (2, 20, 1, 3), (0, 20, 5, 5),
                                                    (3, 5, 10, 5)])
def test_first_pruned_epoch_is_the_first_step_with_a_target(start, end, every, first):
    s = ScheduleOptions(start_epoch=start, end_epoch=end, final_amount=0.5, every=every)
    assert S.first_pruned_epoch(s) == first
    assert all(S.schedule_amount(e, s) == 0 for e in range(first)) and S.schedule_amount(first, s) > 0


def test_schedule_without_a_dense_epoch_validates_the_dense_starting_weights(backend, tiny_data, tiny_cfg, tmp_path,
                                                                            monkeypatch):
    """start_epoch == end_epoch == 0: epoch 0 already trains pruned, so no epoch of the history is dense. The
    "before" metrics must come from the model as it was at on_train_start, not from the pruned candidate."""
    import yolo_prune_plugin.pipeline as P
    from yolo_prune_plugin.training.dense_reference import DenseReference

    seen = []

    def spy(model, settings, *a, **k):  # the real validation, recording how sparse the validated model is
        seen.append(sparsity_stats(model).sparsity)
        return real(model, settings, *a, **k)

    real = P.evaluate
    monkeypatch.setattr(P, "evaluate", spy)
    snaps = []
    real_capture = DenseReference.capture

    def capture(self, model, start_epoch):  # the real snapshot, seen (weakly) from here
        real_capture(self, model, start_epoch)
        snaps.append((weakref.ref(self.model), sparsity_stats(self.model).sparsity,
                      next(self.model.parameters()).device.type))

    monkeypatch.setattr(DenseReference, "capture", capture)
    cfg = config_from_dict({"schedule": {"start_epoch": 0, "end_epoch": 0, "final_amount": 0.5}})
    opt = _opt(backend, tiny_data, tiny_cfg, tmp_path, "sched0", epochs=1)
    torch.manual_seed(0)
    plugin = run_training(opt, cfg, backend)
    assert plugin.error is None and plugin.ran
    assert len(seen) == 1 and seen[0] < 0.01, seen  # the dense snapshot was validated (the candidate: 50 % zeros)
    assert [st["epoch"] for st in plugin.gradual.steps] == [0] and plugin.gradual.dense.dense_epoch == -1
    report = json.loads((Path(opt.save_dir) / "prune_report.json").read_text())
    [entry] = validate_report(report)
    assert entry.metrics_before is not None and entry.sparsity_after["sparsity"] == pytest.approx(0.5, abs=1e-5)
    assert entry.metrics_before_source.startswith("dense starting weights (snapshot at on_train_start, epoch 0")
    assert "validated by the plugin" in entry.metrics_before_source and "no dense epoch" in entry.metrics_before_source
    [(snap, sparsity, device)] = snaps  # the starting weights: dense, on the CPU, not the weights training ended with
    assert sparsity < 0.01 and device == "cpu"
    gc.collect()
    assert plugin.gradual.dense.model is None and snap() is None  # released: the plugin keeps no model copy


def test_resumed_schedule_reports_before_as_absent_with_the_reason(backend, tiny_model, tiny_data, tmp_path, caplog):
    """A run resumed after pruning began has no dense weights: "before" is absent with the reason, and the pipeline
    never validates the (pruned) source in its place; the bench baseline is the dense architecture from the YAML."""
    from yolo_prune_plugin import pipeline
    from yolo_prune_plugin.training.dense_reference import DenseReference
    from yolo_prune_plugin.report import format_table

    prune_model(tiny_model, 0.5, log=False)
    dense = DenseReference(first_pruned=1)
    dense.capture(tiny_model, start_epoch=2)  # resumed at epoch 2: the weights are already 50 % zeros
    before = dense.before([{"epoch": 2, "P": 0.1, "R": 0.1, "mAP50": 0.1, "mAP50-95": 0.1}])
    assert before.metrics is None and before.reference is None and dense.model is None
    assert before.source.startswith("absent: epoch 0 is the last dense epoch") and "resumed at epoch 2" in before.source
    last = save_checkpoint(tiny_model, tmp_path / "last.pt")
    cfg = config_from_dict({"schedule": {"start_epoch": 0, "end_epoch": 1, "final_amount": 0.5}, "bench": True})
    ctx = pipeline.context_from_opt({"data": str(tiny_data), "imgsz": 64, "batch_size": 2, "device": "cpu",
                                     "workers": 0}, cfg, backend)
    ckpt = load_checkpoint(last)
    with caplog.at_level("WARNING", logger="yolo_prune_plugin"):
        entry = pipeline.run(last, cfg, ctx, ckpt=ckpt, pruned=ckpt["model"], mode="schedule",
                             out=tmp_path / "best_pruned.pt", schedule={"dense_stats": None}, before=before.metrics,
                             before_source=before.source, reference=before.reference)
    assert entry.metrics_before is None and entry.metrics_after is not None
    assert entry.metrics_before_source == before.source and "no 'before' metrics: absent" in caplog.text
    assert "(before: absent: epoch 0" in format_table(entry.to_dict())
    ref, pruned = entry.bench
    assert ref["reference"].startswith("dense architecture rebuilt from the checkpoint's model YAML")
    assert ref["params"] == pruned["params"] and ref["gflops"] == pytest.approx(pruned["gflops"])  # zeros only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_pruned.pt", "last.pt"]


# ---------------------------------------------------------------------------------------------------
# rejected before training
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,env,opt_epochs,match", [
    ({"method": "obs", "schedule": {"end_epoch": 2, "final_amount": 0.5}}, {}, 5, "data-aware"),
    ({"schedule": {"end_epoch": 5, "final_amount": 0.5}}, {}, 5, "end_epoch"),
])
def test_register_rejects_unusable_configs(backend, monkeypatch, cfg, env, opt_epochs, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    callbacks = backend.Callbacks()
    with pytest.raises(ConfigError, match=match):
        register(callbacks, config_from_dict(cfg), opt=train_opt([], backend, epochs=opt_epochs))
    assert not any(callbacks.get_registered_actions(h) for h in callbacks._callbacks)


def test_cubic_sparsity_edges():
    assert S.cubic_sparsity(-1, 0, 4, 0.9) == 0.0 and S.cubic_sparsity(9, 0, 4, 0.9) == 0.9
    assert S.cubic_sparsity(2, 0, 4, 0.8) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert math.isclose(S.cubic_sparsity(4, 4, 4, 0.3), 0.3)


def test_leak_is_detected_when_the_hooks_are_missing(backend, tiny_model, tiny_data, tiny_cfg, tmp_path, monkeypatch):
    """Control for the zero-leak counters: without the optimizer hooks, a real fine-tune leaks and is refused."""
    prune_model(tiny_model, 0.5, log=False)
    pruned = save_checkpoint(tiny_model, tmp_path / "pruned.pt")
    monkeypatch.setattr(M.MaskKeeper, "_pre_step", lambda self, opt, *a: self._restore_lr(opt))  # lr only, no mask
    monkeypatch.setattr(M.MaskKeeper, "_post_step", lambda self, *a: None)
    with pytest.raises(PruneError, match="became non-zero"):
        F.finetune_checkpoint(pruned, _opt(backend, tiny_data, tiny_cfg, tmp_path, "base"), 1, project=tmp_path,
                              name="leaky", backend=backend)
    _assert_yolov5_restored(backend)
    masks = M.zero_masks(load_checkpoint(pruned)["model"])
    assert M.file_leaks(tmp_path / "leaky" / "weights" / "last.pt", masks)["model"] > 0


class _Stop(Exception):
    pass


def test_finetune_options_ignore_the_host_process_argv(backend, tiny_model, tiny_data, tiny_cfg, tmp_path,
                                                        monkeypatch):
    """A user script run with ``-h`` or its own flags: YOLOv5's train options come from the run, not sys.argv."""
    pruned = save_checkpoint(tiny_model, tmp_path / "pruned.pt")
    base = _opt(backend, tiny_data, tiny_cfg, tmp_path, "base")
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
