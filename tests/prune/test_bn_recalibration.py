"""prune/bn_recalibration.py: BatchNorm running statistics re-estimated after pruning."""

from __future__ import annotations


import pytest
import torch


from yolo_prune_plugin.prune.unstructured import conv_layers
from yolo_prune_plugin.prune.bn_recalibration import recalibrate_bn
from yolo_prune_plugin.prune.channel import channel_prune


pytestmark = pytest.mark.usefixtures("one_thread")


def test_bn_recalibration_changes_running_stats_never_conv_weights(small_model):
    channel_prune(small_model, 0.3, imgsz=64, log=False)
    convs = {n: m.weight.clone() for n, m in conv_layers(small_model)}
    bn = {n: m.running_mean.clone() for n, m in small_model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    recalibrate_bn(small_model, torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)), batch_size=2)
    assert all(torch.equal(m.weight, convs[n]) for n, m in conv_layers(small_model))
    changed = [n for n, m in small_model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
               and not torch.equal(m.running_mean, bn[n])]
    assert len(changed) == len(bn)
