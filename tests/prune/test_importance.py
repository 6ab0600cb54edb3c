"""prune/importance.py: the per-weight scores of Conv2d layers: magnitude |W| (l1_scores) and LAMP
(lamp_scores, hand-checked); one tensor per layer shaped like its weight, lower = pruned first."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from yolo_prune_plugin.prune.importance import l1_scores, lamp_scores


def _layers(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (o, c, k) in enumerate(shapes):
        conv = nn.Conv2d(c, o, k, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        out.append((f"c{i}", conv))
    return out


# ---------------------------------------------------------------------------------------------------
# magnitude
# ---------------------------------------------------------------------------------------------------
def test_l1_scores_are_absolute_weights_per_layer():
    layers = _layers((4, 3, 3), (2, 4, 1))
    before = [m.weight.detach().clone() for _, m in layers]
    scores = l1_scores(layers)
    assert len(scores) == 2
    for s, (_, m), w in zip(scores, layers, before):
        assert s.shape == m.weight.shape and s.dtype == m.weight.dtype
        assert torch.equal(s, w.abs())
        assert not s.requires_grad  # detached: safe to rank under autograd
        assert torch.equal(m.weight, w)  # the weights are not touched


def test_l1_scores_sign_free_hand_example():
    conv = nn.Conv2d(1, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.5, -3.0, 0.0, 2.0]).view(-1, 1, 1, 1))
    (scores,) = l1_scores([("c", conv)])
    assert torch.equal(scores.flatten(), torch.tensor([0.5, 3.0, 0.0, 2.0]))


def test_l1_scores_empty_scope():
    assert l1_scores([]) == [] and lamp_scores([]) == []


# ---------------------------------------------------------------------------------------------------
# LAMP (Lee et al. 2021)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights, expected", [
    ([1.0, 2.0, 3.0], [1 / 14, 4 / 13, 1.0]),        # 1/(1+4+9), 4/(4+9), 9/9
    ([2.0, -1.0, 3.0], [4 / 13, 1 / 14, 1.0]),       # sign-free, order of positions kept
    ([0.5, -3.0, 1.0, 2.0], [0.25 / 14.25, 1.0, 1 / 14, 4 / 13]),
])
def test_lamp_scores_hand_checked(weights, expected):
    conv = nn.Conv2d(1, len(weights), 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(weights).view(-1, 1, 1, 1))
    (scores,) = lamp_scores([("c", conv)])
    assert scores.shape == conv.weight.shape
    assert torch.allclose(scores.flatten(), torch.tensor(expected), atol=1e-7)


def test_lamp_largest_weight_of_every_layer_scores_one():
    layers = _layers((8, 4, 3), (16, 8, 1), (3, 16, 3), seed=1)
    for s, (_, m) in zip(lamp_scores(layers), layers):
        w = m.weight.detach().abs().flatten()
        assert s.flatten()[w.argmax()] == 1.0
        assert s.max() == 1.0 and s.min() > 0


def test_lamp_ranks_like_magnitude_within_a_layer():
    (name, conv), = _layers((6, 5, 3), seed=2)
    (s,) = lamp_scores([(name, conv)])
    order_w = torch.argsort(conv.weight.detach().abs().flatten())
    assert torch.all(s.flatten()[order_w].diff() > 0)  # strictly increasing along ascending |w|


def test_lamp_is_scale_free_per_layer():
    """Scaling a whole layer changes nothing: what makes one global LAMP threshold fair across layers."""
    layers = _layers((4, 3, 3), (4, 4, 3), seed=3)
    before = lamp_scores(layers)
    with torch.no_grad():
        layers[1][1].weight.mul_(1000.0)
    after = lamp_scores(layers)
    for a, b in zip(before, after):
        assert torch.allclose(a, b, rtol=1e-5)
    # magnitude, in contrast, ranks most of the scaled layer above every weight of the other one
    l1 = l1_scores(layers)
    assert l1[1].median() > l1[0].max()


def test_lamp_half_weights_scored_in_float32():
    (name, conv), = _layers((4, 2, 3), seed=4)
    half = conv.half()
    (s,) = lamp_scores([(name, half)])
    assert s.dtype == torch.float32 and s.shape == half.weight.shape
    assert torch.allclose(s, lamp_scores([(name, half.float())])[0])


def test_lamp_all_zero_layer_is_finite():
    conv = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
    (s,) = lamp_scores([("c", conv)])
    assert torch.equal(s, torch.zeros_like(s))  # no 0/0 NaN
