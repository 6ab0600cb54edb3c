"""dense_reference.py: where a schedule run's "before" metrics and dense bench baseline come from (the history's
last dense epoch, else a snapshot of the dense starting weights, else absent with the reason); the dense
architecture rebuilt from a model's YAML. Small real models and hand-written histories: no training."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from yolo_prune_plugin.backend.evaluation import Metrics
from yolo_prune_plugin.training.dense_reference import DenseBefore, DenseReference, ReferenceModel, rebuild_dense


def _row(epoch, m=0.5, **extra):
    return {"epoch": epoch, "P": 0.9, "R": 0.8, "mAP50": m, "mAP50-95": m / 2, **extra}


def _widths(model):
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.fixture
def trained(tiny_model):
    """tiny_model with weights unlike a fresh init (seeded), in train mode with gradients on, as in train()."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return tiny_model.train()


@pytest.fixture
def net():
    """A small module for the bookkeeping tests (the snapshot itself is checked on a real YOLOv5 model)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_dense_epoch_is_the_one_before_the_first_pruned():
    assert DenseReference(3).dense_epoch == 2
    assert DenseReference(0).dense_epoch == -1


def test_before_training_started_says_so():
    before = DenseReference(2).before([])
    assert before == DenseBefore(None, "absent: epoch 1 is the last dense epoch and was not trained in this run, and "
                                       "training did not start (no on_train_start)", None, 1)


def test_capture_keeps_an_independent_frozen_cpu_fp32_copy(trained):
    dense = DenseReference(first_pruned=2)
    dense.capture(nn.DataParallel(trained), start_epoch=0)  # the wrapper is unwrapped
    snap = dense.model
    assert snap is not None and snap is not trained and type(snap) is type(trained)
    assert dense.reason is None and dense.start_epoch == 0
    assert not snap.training and all(not p.requires_grad for p in snap.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in snap.parameters())
    ref = {k: v.clone() for k, v in snap.state_dict().items()}
    with torch.no_grad():
        for p in trained.parameters():
            p.zero_()  # what a schedule step does to the live model later
    assert all(torch.equal(ref[k], v) for k, v in snap.state_dict().items())
    assert any(v.abs().sum() > 0 for v in ref.values())
    assert trained.training and all(p.requires_grad for p in trained.parameters())  # the live model untouched


@pytest.mark.parametrize("start_epoch,kept", [(0, True), (2, True), (3, False)])
def test_capture_only_while_the_starting_weights_are_dense(net, start_epoch, kept):
    dense = DenseReference(first_pruned=2)
    dense.capture(net, start_epoch)
    assert (dense.model is not None) is kept
    if not kept:
        assert dense.reason == ("the run resumed at epoch 3, after pruning began (epoch 2): its dense weights are not "
                                "in this run")


def test_row_is_the_validated_dense_epoch():
    dense = DenseReference(first_pruned=2)
    history = [_row(0, 0.1), {"epoch": 1, "lr": 0.01}, _row(1, 0.3), _row(2, 0.2)]
    assert dense.row(history) is history[2]  # epoch 1, the one with validation numbers
    assert dense.row([_row(0), _row(2)]) is None
    assert dense.row([{"epoch": 1, "P": 1.0}]) is None  # no mAP50: not a validation row


def test_before_prefers_the_training_history(net):
    dense = DenseReference(first_pruned=2)
    dense.capture(net, start_epoch=0)
    before = dense.before([_row(0, 0.1), _row(1, 0.4), _row(2, 0.2)])
    assert before.metrics == Metrics(0.9, 0.8, 0.4, 0.2)
    assert before.source == "epoch 1 (dense, training history)" and before.epoch == 1
    assert isinstance(before.reference, ReferenceModel) and before.reference.model is dense.model
    assert before.reference.weights is True
    assert before.reference.note == ("dense starting weights (snapshot at on_train_start, epoch 0, before any "
                                     "schedule step)")


def test_history_metrics_without_a_snapshot_have_no_reference():
    before = DenseReference(first_pruned=1).before([_row(0, 0.6)])
    assert before.metrics == Metrics(0.9, 0.8, 0.6, 0.3) and before.reference is None


@pytest.mark.parametrize("first_pruned,why", [
    (0, "the schedule prunes from epoch 0: no dense epoch"),
    (3, "epoch 2 is the last dense epoch and was not trained in this run"),
])
def test_without_a_dense_row_the_snapshot_is_validated(net, first_pruned, why):
    dense = DenseReference(first_pruned)
    dense.capture(net, start_epoch=0)
    before = dense.before([_row(first_pruned, 0.9)])  # only pruned epochs in the history
    assert before.metrics is None and before.reference.model is dense.model and before.epoch == first_pruned - 1
    assert before.source == (f"dense starting weights (snapshot at on_train_start, epoch 0, before any schedule "
                             f"step), validated by the plugin ({why})")


def test_release_drops_the_snapshot_and_says_so(net):
    dense = DenseReference(first_pruned=1)
    dense.capture(net, start_epoch=0)
    dense.release()
    assert dense.model is None and dense.reason == "released after train end"
    before = dense.before([])
    assert before.reference is None and before.metrics is None
    assert before.source == ("absent: epoch 0 is the last dense epoch and was not trained in this run, and released "
                             "after train end")
    dense.release()  # twice: nothing to drop, the reason stays
    assert dense.reason == "released after train end"


def test_release_keeps_the_resume_reason(net):
    dense = DenseReference(first_pruned=1)
    dense.capture(net, start_epoch=4)
    dense.release()
    assert dense.reason.startswith("the run resumed at epoch 4")


# -- rebuild_dense ------------------------------------------------------------------------------------------
def test_rebuild_dense_restores_full_width_and_keeps_metadata(backend, tiny_model):
    full = _widths(tiny_model)
    tiny_model.names = {0: "circle", 1: "rectangle", 2: "triangle"}
    tiny_model.hyp = {"box": 0.05}
    tiny_model.nc = 3
    stem = tiny_model.model[0].conv  # a channel-pruned stem (pruning changes modules, never model.yaml)
    tiny_model.model[0].conv = nn.Conv2d(3, stem.out_channels // 2, stem.kernel_size, stem.stride, stem.padding,
                                         bias=False)
    assert _widths(tiny_model) != full
    ref = rebuild_dense(tiny_model, backend)
    assert isinstance(ref, ReferenceModel) and ref.weights is False and "random weights" in ref.note
    assert _widths(ref.model) == full and not ref.model.training
    assert all(p.dtype == torch.float32 for p in ref.model.parameters())
    assert ref.model.names == tiny_model.names and ref.model.names is not tiny_model.names  # copies
    assert ref.model.hyp == {"box": 0.05} and ref.model.nc == 3 and ref.model.model[-1].nc == 3
    assert torch.equal(ref.model.stride, tiny_model.stride)
    with torch.no_grad():
        y = ref.model(torch.zeros(1, 3, 64, 64))[0]
    assert y.shape[-1] == 5 + 3  # a working detector of the same classes


def test_rebuild_dense_without_a_yaml_is_none(backend):
    assert rebuild_dense(nn.Sequential(nn.Conv2d(3, 4, 1)), backend) is None
