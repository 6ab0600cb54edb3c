"""training/channel_regularize.py: the targeted BatchNorm-scale penalty inside YOLOv5's own training loop."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("torch_pruning")

from yolo_prune_plugin.config import config_from_dict  # noqa: E402
from yolo_prune_plugin.errors import ConfigError  # noqa: E402
from yolo_prune_plugin.training.channel_regularize import ChannelRegularizer  # noqa: E402

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
    sum(o.sum() for o in model(torch.rand(2, 3, 64, 64))).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: seen.update({n: p.grad.clone() for n, p in model.named_parameters()}))
    opt.step()  # the plugin's pre-hook runs first (registered first)
    targeted = {f"{bn}.weight": idx for bn, idx in reg.targets.items()}
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


@pytest.mark.parametrize("cfg,match", [
    ({"structure": "channel", "channel": {"regularize": {"weight": -1}}}, "'channel.regularize.weight' must be in"),
    ({"structure": "channel", "channel": {"regularize": {"from": 1}}}, "channel.regularize.from"),
    ({"structure": "channel", "channel": {"regularize": 3}}, "'channel.regularize' must be a mapping"),
    ({"channel": {"regularize": {"weight": 0.001}}}, "needs 'structure: channel'"),
])
def test_bad_regularize_configs(cfg, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(cfg)


def test_penalty_is_logged_per_epoch_in_a_real_training_run(backend, tiny_data, tmp_path):
    """Real YOLOv5 train.main, 2 epochs, penalty from epoch 1: in the report history for epoch 1 only."""
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
    assert abs(report["results"][0]["channels"]["achieved"] - 0.3) <= 0.02


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
