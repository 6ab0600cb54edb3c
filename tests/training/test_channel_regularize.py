"""training/channel_regularize.py: the targeted BatchNorm scale/shift penalty inside YOLOv5's own training loop,
and the train-end prune that removes exactly its plan."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from testkit import seeded_rand


from yolo_prune_plugin.config import config_from_dict
from yolo_prune_plugin.errors import ConfigError, PruneError
from yolo_prune_plugin.prune.channel import channel_prune
from yolo_prune_plugin.training.channel_regularize import ChannelRegularizer, regularize_targets

pytestmark = pytest.mark.usefixtures("one_thread")


def test_regulariser_changes_only_the_targeted_gradients(small_model):
    cfg = config_from_dict({"structure": "channel", "amount": 0.3,
                            "channel": {"regularize": {"weight": 0.01, "from_epoch": 1}}})
    model = small_model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg = ChannelRegularizer(cfg)
    reg.attach(model, opt, start_epoch=0)
    reg.epoch_start()  # epoch 0 < from_epoch: nothing yet
    assert not reg.targets and reg.penalty() == 0.0
    reg.epoch_start()
    assert reg.targets and reg.epoch == 1
    sum(o.sum() for o in model(seeded_rand(2, 3, 64, 64))).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: seen.update({n: p.grad.clone() for n, p in model.named_parameters()}))
    opt.step()  # the plugin's pre-hook runs first (registered first)
    targeted = {f"{bn}.{p}": idx for bn, idx in reg.targets.items() for p in ("weight", "bias")}
    for n, g in seen.items():
        diff = g - before[n]
        if n not in targeted:
            assert torch.equal(diff, torch.zeros_like(diff)), f"{n}: gradient changed but not targeted"
            continue
        w = dict(model.named_parameters())[n].detach()
        want = torch.zeros_like(w)
        want[targeted[n]] = 0.01 * torch.sign(w[targeted[n]])
        assert torch.allclose(diff, want, atol=1e-6 * max(1.0, float(before[n].abs().max()))), n
        assert torch.equal(diff != 0, want != 0), n  # exactly the targeted channels
    reg.fit_epoch_end(1)
    assert reg.history[0]["epoch"] == 1 and reg.history[0]["regularize_penalty"] > 0
    reg.close()
    opt.step()  # hook gone: no further change
    assert all(torch.equal(p.grad, seen[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("max_drop", [0.02, None])
def test_lambda_backs_off_when_val_drops_and_pushes_when_the_penalty_stalls(small_model, caplog, max_drop):
    """``channel.regularize.max_drop``: the reference is the best val mAP50-95 before the penalty; an epoch more than
    max_drop below it halves lambda (floor weight / 64), an epoch within max_drop / 2 whose L1 sum did not fall by
    10 % raises it 1.5x (cap 4 x weight); the gradient added is the current lambda; ``null``: lambda never moves."""
    caplog.set_level(logging.INFO, logger="yolo_prune_plugin")
    cfg = config_from_dict({"structure": "channel", "amount": 0.3,
                            "channel": {"regularize": {"weight": 0.1, "from_epoch": 2, "max_drop": max_drop}}})
    model = small_model.train()
    reg = ChannelRegularizer(cfg)
    reg.attach(model, torch.optim.SGD(model.parameters(), lr=0.0), start_epoch=0)
    for epoch, val in enumerate([0.50, 0.60]):  # before the penalty: the reference is the best of them
        reg.epoch_start()
        reg.fit_epoch_end(epoch, val)
    assert not reg.history and reg.reference == 0.60
    reg.epoch_start()
    weights = []
    for epoch, val in enumerate([0.55, 0.50, 0.595, 0.6, 0.30, 0.30, 0.30, 0.30, 0.30, 0.30, 0.30], start=2):
        weights.append(reg.weight)
        reg.fit_epoch_end(epoch, val)  # nothing trains here: the L1 sum never falls
    if max_drop is None:
        assert set(weights) == {0.1} and not any("regularize_change" in h for h in reg.history)
        return
    assert weights[:5] == pytest.approx([0.1, 0.05, 0.025, 0.0375, 0.05625])  # halve, halve, push, push
    assert reg.weight == pytest.approx(0.1 / 64)  # the floor after six more halvings
    assert [h["regularize_weight"] for h in reg.history][:3] == pytest.approx([0.1, 0.05, 0.025])
    assert "is 0.0500 below 0.6000 (max_drop 0.02)" in reg.history[0]["regularize_change"]
    assert "L1 sum fell < 10 %" in reg.history[2]["regularize_change"] and "lambda 0.1 -> 0.05" in caplog.text
    for _ in range(20):  # stalled and on target: pushed up to the cap
        reg.fit_epoch_end(99, 0.60)
    assert reg.weight == pytest.approx(0.4)
    model.zero_grad()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    reg.add_gradients()
    bn, idx = next(iter(reg.targets.items()))
    w = dict(model.named_modules())[bn].weight
    assert torch.allclose(w.grad[idx], 0.4 * torch.sign(w.detach()[idx]))


@pytest.mark.parametrize("cfg,match", [
    ({"structure": "channel", "channel": {"regularize": {"weight": -1}}}, "'channel.regularize.weight' must be in"),
    ({"structure": "channel", "channel": {"regularize": {"from": 1}}}, "channel.regularize.from"),
    ({"structure": "channel", "channel": {"regularize": 3}}, "'channel.regularize' must be a mapping"),
    ({"channel": {"regularize": {"weight": 0.001}}}, "needs 'structure: channel'"),
    ({"structure": "channel", "target": {"max_size": 0.6}, "channel": {"regularize": {"weight": 0.01}}},
     "'target' chooses the amount only at train end"),
    ({"structure": "channel", "channel": {"regularize": {"max_drop": 1.5}}},
     r"'channel.regularize.max_drop' must be in \(0, 1\) \(mAP50-95, absolute\)"),
])
def test_bad_regularize_configs(cfg, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(cfg)


def test_penalty_is_logged_per_epoch_in_a_real_training_run(backend, tiny_data, tmp_path, caplog):
    """Real YOLOv5 train.main, 2 epochs, penalty from epoch 1: in the report history for epoch 1 only (with lambda);
    the train-end prune removes exactly the plan and reports what was left of it (one epoch at lambda 0.001 trains
    nothing away: a warning names the fine-tune that wins it back)."""
    from yolo_prune_plugin.cli import main
    from yolo_prune_plugin.tools.synthetic import TINY

    cfg = tmp_path / "prune.yaml"
    cfg.write_text("structure: channel\namount: 0.3\nevaluate: false\nbn_recalibration: {images: 0}\n"
                   "channel: {importance: l1, regularize: {weight: 0.001, from_epoch: 1}}\n")
    o = TINY.train_overrides(tiny_data, tmp_path / "runs", "exp", yolov5_root=backend.root)
    rc = main(["train", "--data", o["data"], "--cfg", o["cfg"], "--weights", "", "--img", str(o["imgsz"]),
               "--epochs", "2", "--batch-size", str(o["batch_size"]), "--workers", "0", "--device", "cpu",
               "--noplots", "--project", o["project"], "--name", "exp", "--prune-config", str(cfg)])
    assert rc == 0
    report = json.loads((tmp_path / "runs" / "exp" / "prune_report.json").read_text())
    hist = report["history"]
    assert [r["epoch"] for r in hist] == [1] and hist[0]["regularize_penalty"] > 0 and hist[0]["regularize_channels"] > 0
    ch = report["results"][0]["channels"]
    assert abs(ch["achieved"] - 0.3) <= 0.02
    assert ch["importance"] == "plan" and ch["plan"].startswith("the channels the penalty")  # no re-ranking
    assert ch["residual"]["channels"] == hist[0]["regularize_channels"] and hist[0]["regularize_weight"] == 0.001
    assert 0 < ch["residual"]["alive"] <= ch["residual"]["channels"] and ch["residual"]["l1"] > 0
    assert "planned channels were not trained away" in caplog.text and "--prune-finetune-epochs" in caplog.text


@pytest.mark.parametrize("fitness, pruned", [((0.5, 0.4), "last.pt"), ((0.5, 0.6), "best.pt")])
def test_best_saved_before_the_penalty_is_not_what_gets_pruned(backend, tmp_path, caplog, fitness, pruned):
    """Fine-tuning a converged model, YOLOv5's best.pt is often an early epoch: from before ``from_epoch`` it carries
    no regularisation (measured: the penalty row then equalled its control to the last digit). The train-end prune
    takes last.pt then, and says so; a best.pt from a penalised epoch is pruned as usual."""
    from yolo_prune_plugin.callbacks import register

    plugin = register(backend.Callbacks(), config_from_dict(
        {"structure": "channel", "channel": {"regularize": {"weight": 0.01, "from_epoch": 1}}}))
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    for f in (last, best):
        f.write_bytes(b"")
    best_fitness = 0.0
    for epoch, fi in enumerate(fitness):  # as YOLOv5's train(): best_fitness, then on_model_save(..., fi)
        best_fitness = max(best_fitness, fi)
        plugin.on_model_save(last, epoch, epoch == len(fitness) - 1, np.array([best_fitness]), np.array([fi]))
    plugin.regularizer.history = [{"epoch": 1, "regularize_penalty": 1.0, "regularize_channels": 8}]
    with caplog.at_level(logging.INFO, logger="yolo_prune_plugin"):
        assert plugin.checkpoints(last, best) == [tmp_path / pruned]
    assert ("before channel.regularize's penalty began" in caplog.text) == (pruned == "last.pt")


def _output(model, x):
    with torch.no_grad():
        return torch.cat([o.flatten() for o in model.eval()(x)[1]])


@pytest.mark.parametrize("shift_zeroed, exact", [(True, True), (False, False)])
def test_channels_with_zero_scale_and_shift_are_removed_exactly(small_model, shift_zeroed, exact):
    """Why the penalty takes the shift too: a targeted channel with gamma = 0 still outputs the constant
    SiLU(beta), which its 3x3 consumers see differently at the zero-padded border, so removing it changes the
    model; with gamma = beta = 0 it outputs 0 and removing exactly the plan leaves the raw outputs unchanged."""
    import copy

    cfg = config_from_dict({"structure": "channel", "amount": 0.3, "channel": {"regularize": {"weight": 0.01}}})
    model = small_model.eval()
    for m in model.modules():  # a trained model's shifts are not 0 (random init has beta = 0)
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.bias, 0.5, 1.5)
    targets, plan = regularize_targets(model, cfg)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for bn, idx in targets.items():
            mods[bn].weight[idx] = 0.0
            if shift_zeroed:
                mods[bn].bias[idx] = 0.0
    x = seeded_rand(1, 3, 64, 64)
    dense = _output(model, x)
    pruned = copy.deepcopy(model)
    res = channel_prune(pruned, 0.3, plan=plan, imgsz=64, log=False)
    assert res.importance == "plan" and res.plan == {k: sorted(v) for k, v in plan.items()}
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    err = float((_output(pruned, x) - dense).abs().max() / dense.abs().max())
    assert (err < 1e-4) == exact, err


def test_a_plan_repeats_the_same_channels_and_a_foreign_plan_is_refused(small_model):
    import copy

    a, b = copy.deepcopy(small_model), copy.deepcopy(small_model)
    res = channel_prune(a, 0.3, importance="l1", imgsz=64, log=False)
    again = channel_prune(b, 0.3, plan=res.plan, imgsz=64, log=False)
    assert again.kept == res.kept and again.channels_after == res.channels_after
    with pytest.raises(PruneError, match="'model.99.conv' is not a prunable channel group"):
        channel_prune(copy.deepcopy(small_model), 0.3, plan={"model.99.conv": [0]}, imgsz=64, log=False)
    with pytest.raises(PruneError, match="'model.0.conv' has 16 channels; cannot remove 16"):
        channel_prune(copy.deepcopy(small_model), 0.3, plan={"model.0.conv": list(range(16))}, imgsz=64, log=False)
    with pytest.raises(PruneError, match="cannot remove 50.0%"):  # a plan for another amount
        channel_prune(copy.deepcopy(small_model), 0.5, plan=res.plan, imgsz=64, log=False)
