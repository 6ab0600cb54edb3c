"""training/masks.py: optimizer hooks that keep pruned zeros exact in the model, its EMA and the optimizer state, and the leak counters, inside YOLOv5's real training loop."""

from __future__ import annotations

import copy

import pytest
import torch

from yolo_prune_plugin.training import finetune as F, masks as M
from yolo_prune_plugin.backend.loading import load_checkpoint
from yolo_prune_plugin.errors import PruneError
from yolo_prune_plugin.prune.unstructured import conv_layers, prune_model, sparsity_stats

from testkit import assert_plain_yolov5, assert_yolov5_restored, save_checkpoint, seeded_rand, tiny_train_opt


# ---------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def _loss(model):
    out = model(seeded_rand(2, 3, 32, 32))  # BatchNorm needs 2 values per channel at P5 (1x1)
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
    assert_yolov5_restored(backend)
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
    assert_plain_yolov5(saved)
    assert M.count_leaks(saved, masks) == 0

    keeper.remove_hooks()  # control: without the hooks the same steps do leak
    step(1)
    assert M.count_leaks(model, masks) > 0


def test_leak_is_detected_when_the_hooks_are_missing(backend, tiny_model, tiny_data, tiny_cfg, tmp_path, monkeypatch):
    """Control for the zero-leak counters: without the optimizer hooks, a real fine-tune leaks and is refused."""
    prune_model(tiny_model, 0.5, log=False)
    pruned = save_checkpoint(tiny_model, tmp_path / "pruned.pt")
    monkeypatch.setattr(M.MaskKeeper, "_pre_step", lambda self, opt, *a: self._restore_lr(opt))  # lr only, no mask
    monkeypatch.setattr(M.MaskKeeper, "_post_step", lambda self, *a: None)
    with pytest.raises(PruneError, match="became non-zero"):
        F.finetune_checkpoint(pruned, tiny_train_opt(backend, tiny_data, tiny_cfg, tmp_path, "base"), 1, project=tmp_path,
                              name="leaky", backend=backend)
    assert_yolov5_restored(backend)
    masks = M.zero_masks(load_checkpoint(pruned)["model"])
    assert M.file_leaks(tmp_path / "leaky" / "weights" / "last.pt", masks)["model"] > 0
