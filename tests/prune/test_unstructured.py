"""prune/unstructured.py on real YOLOv5 models: exact global sparsity, layerwise parity, include/exclude, logging."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from yolo_prune_plugin.errors import ConfigError
from yolo_prune_plugin.prune.unstructured import check_scope, conv_layers, prune_model, sparsity_stats


def _zeros(model):
    return sum(int((m.weight == 0).sum()) for _, m in conv_layers(model))


@pytest.mark.parametrize("method", ["global", "lamp"])
@pytest.mark.parametrize("amount", [0.1, 0.3, 0.5, 0.9])
def test_exact_global_sparsity_small_model(small_model, method, amount):
    total = sum(m.weight.numel() for _, m in conv_layers(small_model))
    result = prune_model(small_model, amount, method)
    assert _zeros(small_model) == round(amount * total)
    assert result.after.zeros == round(amount * total)
    assert abs(result.after.sparsity - amount) < 1e-6
    # no pruning re-parametrisation is left behind
    for _, m in conv_layers(small_model):
        assert not hasattr(m, "weight_orig") and not hasattr(m, "weight_mask")
        assert isinstance(m.weight, torch.nn.Parameter)
        assert not m._forward_pre_hooks


@pytest.mark.parametrize("amount", [0.3, 0.5])
def test_exact_global_sparsity_pretrained_yolov5n(yolov5n, amount):
    model = copy.deepcopy(yolov5n)
    result = prune_model(model, amount, "global")
    assert abs(result.after.sparsity - amount) < 1e-6
    # a global threshold prunes layers unevenly: it is not the per-layer ratio
    ratios = [s.sparsity for s in result.after.layers]
    assert max(ratios) - min(ratios) > 0.2


def test_global_prunes_smallest_magnitudes(yolov5n):
    model = copy.deepcopy(yolov5n)
    before = torch.cat([m.weight.detach().abs().flatten() for _, m in conv_layers(model)])
    prune_model(model, 0.4, "global")
    after = torch.cat([m.weight.detach().flatten() for _, m in conv_layers(model)])
    kept, pruned = before[after != 0], before[after == 0]
    assert pruned.max() <= kept.min()


def test_layerwise_matches_yolov5_prune(backend, small_model):
    torch_utils = __import__(backend.prefix + "utils.torch_utils", fromlist=["prune"])
    theirs = copy.deepcopy(small_model)
    torch_utils.prune(theirs, 0.3)  # YOLOv5's own per-layer L1 pruning
    prune_model(small_model, 0.3, "layerwise")
    for (n1, a), (n2, b) in zip(conv_layers(small_model), conv_layers(theirs)):
        assert n1 == n2
        assert torch.equal(a.weight, b.weight), n1


def test_exclude_leaves_detect_head_dense(small_model):
    head = [m for n, m in conv_layers(small_model) if n.startswith("model.24.")]
    assert head, "the Detect head has Conv2d layers"
    dense = [m.weight.clone() for m in head]
    result = prune_model(small_model, 0.5, "global", exclude=["model.24.*"])
    assert all(torch.equal(m.weight, w) for m, w in zip(head, dense))
    assert abs(result.after.sparsity - 0.5) < 1e-6
    assert all(not s.name.startswith("model.24.") for s in result.after.layers)


def test_include_limits_scope(small_model):
    layers = conv_layers(small_model, include=["model.0", "model.1.*"])
    assert [n for n, _ in layers] == ["model.0.conv", "model.1.conv"]
    other = [(n, m.weight.clone()) for n, m in conv_layers(small_model) if not n.startswith(("model.0.", "model.1."))]
    prune_model(small_model, 0.5, "global", include=["model.0", "model.1.*"])
    assert all(torch.equal(dict(small_model.named_modules())[n].weight, w) for n, w in other)
    stats = sparsity_stats(small_model, conv_layers(small_model, include=["model.0", "model.1.*"]))
    assert abs(stats.sparsity - 0.5) < 1e-3


@pytest.mark.parametrize("include,exclude,match", [
    (["model.99.*"], [], "'include' pattern 'model.99.*' matches no Conv2d"),
    ([], ["nothing*"], "'exclude' pattern 'nothing\\*' matches no Conv2d"),
    (["model.0.*"], ["model.0.*"], "leave no Conv2d layer in scope"),
])
def test_scope_errors(small_model, include, exclude, match):
    with pytest.raises(ConfigError, match=match):
        check_scope(small_model, include, exclude)


def test_no_conv_model_is_an_error():
    with pytest.raises(ConfigError, match="no Conv2d layers"):
        prune_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), 0.3)


@pytest.mark.parametrize("amount", [-0.1, 1.0, 1.5])
def test_amount_out_of_range(small_model, amount):
    with pytest.raises(ConfigError, match="0 <= amount < 1"):
        prune_model(small_model, amount)


def test_log_line(small_model, caplog):
    with caplog.at_level(logging.INFO, logger="yolo_prune_plugin"):
        prune_model(small_model, 0.25)
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Pruned:")]
    assert len(line) == 1
    total = sum(m.weight.numel() for _, m in conv_layers(small_model))
    assert f"-> {round(0.25 * total)}/{total} (25.00%)" in line[0]
