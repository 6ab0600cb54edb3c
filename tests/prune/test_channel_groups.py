"""prune/channel_groups.py on a real YOLOv5n (random init): Torch-Pruning's dependency groups (every prunable
Conv2d in exactly one group, Detect's outputs never), channel importance, per-channel MACs (exact against a
forward-hook count), channel counts and GFLOPs (as YOLOv5's own model_info computes them)."""

from __future__ import annotations

import copy
import importlib
import re

import pytest
import torch
import torch.nn as nn

from yolo_prune_plugin.errors import ConfigError
from yolo_prune_plugin.prune import channel_groups as cg
from yolo_prune_plugin.prune.registry import CHANNEL_IMPORTANCES
from yolo_prune_plugin.prune.unstructured import conv_layers

IMGSZ = 64


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _groups(model, imgsz=IMGSZ):
    return cg._build_groups(model, cg.detect_output_convs(model), imgsz)


def _group(groups, name):
    return next(g for n, g in groups if n == name)


def _convs(dg, g, out):
    """The Conv2d members of group ``g`` whose output (``out``) or input channels it prunes."""
    mods = [(it.dep.target.module, bool(dg.is_out_channel_pruning_fn(it.dep.handler))) for it in g]
    return [m for m, is_out in mods if isinstance(m, nn.Conv2d) and is_out == out]


def _conv_macs(model, imgsz=IMGSZ):
    """Multiply-accumulates of every Conv2d in one forward pass, counted independently with hooks."""
    total = [0]

    def hook(m, inp, out):
        total[0] += m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups * m.out_channels * \
            out.shape[-1] * out.shape[-2]

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, imgsz, imgsz))
    for h in hs:
        h.remove()
    return total[0]


def _pruned(model, name, r):
    """A copy of ``model`` with the first ``r`` channels of group ``name`` removed (as channel.py applies plans)."""
    m = copy.deepcopy(model)
    _, groups = _groups(m)
    _group(groups, name).prune(idxs=list(range(r)))
    return m


# ---------------------------------------------------------------------------------------------------
# groups
# ---------------------------------------------------------------------------------------------------
def test_detect_output_convs(small_model):
    det = small_model.model[-1]
    convs = cg.detect_output_convs(small_model)
    assert convs == list(det.m) and len(convs) == det.nl == 3
    assert all(isinstance(c, nn.Conv2d) and c.out_channels == det.na * (5 + 3) for c in convs)


def test_detect_output_convs_without_detect_head():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1))

    assert cg.detect_output_convs(Plain()) == []


def test_every_prunable_conv_is_in_exactly_one_group(small_model):
    dg, groups = _groups(small_model)
    names = {m: n for n, m in small_model.named_modules()}
    detect = {names[m] for m in cg.detect_output_convs(small_model)}
    members = [names[m] for _, g in groups for m in _convs(dg, g, out=True)]
    assert sorted(members) == sorted(n for n, _ in conv_layers(small_model) if n not in detect)
    roots = [n for n, _ in groups]
    assert len(set(roots)) == len(roots)
    for name, g in groups:  # the root is the group's first item and one of its output-channel convs
        assert names[g[0].dep.target.module] == name and g[0].dep.target.module in _convs(dg, g, out=True)
    # coupled convs share a group: a C3's cv1 and its bottlenecks' cv2 are added together
    c3 = next(g for _, g in groups if small_model.model[2].cv1.conv in _convs(dg, g, out=True))
    assert small_model.model[2].m[0].cv2.conv in _convs(dg, c3, out=True)


def test_ignoring_detect_is_what_keeps_its_outputs(small_model):
    _, groups = cg._build_groups(small_model, [], IMGSZ)
    assert any(n.startswith("model.24.m.") for n, _ in groups)


def test_group_channel_count_matches_conv_widths(small_model):
    dg, groups = _groups(small_model)
    for name, g in groups:
        n = len(g[0].idxs)
        outs = _convs(dg, g, out=True)
        assert all(c.out_channels == n for c in outs), name
        bns = [it.dep.target.module for it in g if isinstance(it.dep.target.module, nn.BatchNorm2d)]
        assert bns and all(b.num_features == n for b in bns), name
        assert all(c.in_channels >= n for c in _convs(dg, g, out=False)), name  # all, or a slice after a Concat


def test_build_groups_restores_requires_grad(small_model):
    """Loaded checkpoints have requires_grad False; tracing needs it on, and it is put back per parameter."""
    params = list(small_model.parameters())
    flags = [i % 3 == 0 for i in range(len(params))]
    for p, f in zip(params, flags):
        p.requires_grad_(f)
    _, groups = _groups(small_model)
    assert groups
    assert [p.requires_grad for p in params] == flags


# ---------------------------------------------------------------------------------------------------
# counts
# ---------------------------------------------------------------------------------------------------
def test_channel_counts(small_model):
    counts = cg.channel_counts(small_model)
    assert counts == {n: [m.out_channels, m.in_channels] for n, m in conv_layers(small_model)}
    assert counts["model.0.conv"] == [16, 3] and counts["model.1.conv"] == [32, 16]  # YOLOv5n's stem
    assert counts["model.24.m.0"] == [24, 64]


def test_removing_group_channels_changes_exactly_its_convs(small_model):
    before = cg.channel_counts(small_model)
    after = cg.channel_counts(_pruned(small_model, "model.0.conv", 4))
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {"model.0.conv", "model.1.conv"}
    assert after["model.0.conv"] == [12, 3] and after["model.1.conv"] == [32, 12]


def test_weights_of_named_convs(small_model):
    names = ["model.0.conv", "model.1.conv"]
    assert cg._weights(small_model, names) == 16 * 3 * 6 * 6 + 32 * 16 * 3 * 3
    pruned = _pruned(small_model, "model.0.conv", 4)
    assert cg._weights(small_model, names) - cg._weights(pruned, names) == 4 * (3 * 6 * 6 + 32 * 3 * 3)


# ---------------------------------------------------------------------------------------------------
# MACs
# ---------------------------------------------------------------------------------------------------
def test_channel_macs_hand_checked_stem(small_model):
    dg, groups = _groups(small_model)
    macs = cg.channel_macs(small_model, groups, dg, IMGSZ)
    assert set(macs) == {n for n, _ in groups}
    # model.0.conv 3->16, k6 s2: 32x32 outputs; its consumer model.1.conv 16->32, k3 s2: 16x16
    assert macs["model.0.conv"] == 6 * 6 * 3 * 32 * 32 + 3 * 3 * 32 * 16 * 16


@pytest.mark.parametrize("name, r", [
    ("model.0.conv", 4),  # a plain chain
    ("model.10.conv", 8),  # concatenated into two C3 blocks
    ("model.4.m.1.cv2.conv", 8),  # C3 residual: cv1 and both bottlenecks' cv2 coupled
    ("model.23.cv3.conv", 16),  # consumed by Detect
])
def test_removed_channels_save_exactly_their_macs(small_model, name, r):
    dg, groups = _groups(small_model)
    macs = cg.channel_macs(small_model, groups, dg, IMGSZ)
    saved = _conv_macs(small_model) - _conv_macs(_pruned(small_model, name, r))
    assert saved > 0
    assert saved == r * macs[name]


def test_channel_macs_scale_with_image_area(small_model):
    dg, groups = _groups(small_model)
    small = cg.channel_macs(small_model, groups, dg, IMGSZ)
    large = cg.channel_macs(small_model, groups, dg, 2 * IMGSZ)
    assert large == {n: 4 * v for n, v in small.items()}


@pytest.mark.parametrize("training", [True, False])
def test_channel_macs_leaves_mode_and_hooks_as_they_were(small_model, training):
    dg, groups = _groups(small_model)
    small_model.train(training)
    cg.channel_macs(small_model, groups, dg, IMGSZ)
    assert small_model.training is training
    assert all(not m._forward_hooks for m in small_model.modules())


# ---------------------------------------------------------------------------------------------------
# importance
# ---------------------------------------------------------------------------------------------------
def _zero_stem_channel(model, j):
    """Zero everything group model.0.conv holds of channel ``j``: conv row, BN scale and shift, consumer column."""
    with torch.no_grad():
        model.model[0].conv.weight[j] = 0
        model.model[0].bn.weight[j] = 0
        model.model[0].bn.bias[j] = 0
        model.model[1].conv.weight[:, j] = 0


@pytest.mark.parametrize("name", ["l1", "l2", "bn", "lamp"])
def test_importance_ranks_a_zeroed_channel_lowest(small_model, name):
    _zero_stem_channel(small_model, 5)
    _, groups = _groups(small_model)
    scores = cg._importance(name)(_group(groups, "model.0.conv"))
    assert scores.shape == (16,) and torch.isfinite(scores).all()
    assert int(scores.argmin()) == 5 and (scores > scores[5]).sum() == 15


def test_taylor_importance_uses_gradients(small_model):
    _zero_stem_channel(small_model, 3)
    small_model.train()
    g = torch.Generator().manual_seed(0)
    out = small_model(torch.rand(1, 3, IMGSZ, IMGSZ, generator=g))
    sum(o.square().sum() for o in out).backward()
    _, groups = _groups(small_model)
    scores = cg._importance("taylor")(_group(groups, "model.0.conv"))
    assert scores.shape == (16,) and int(scores.argmin()) == 3


def test_importance_without_a_torch_pruning_criterion_is_refused():
    """An unknown name lists the choices; 'obs' (a choice, scored in channel_sensitivity.py with calibration images:
    channel.py passes 'l1' here for it) is refused with that reason, not as unknown."""
    with pytest.raises(ConfigError, match=re.escape("importance 'l3' is unknown; expected one of "
                                                    f"{', '.join(CHANNEL_IMPORTANCES)}")):
        cg._importance("l3")
    with pytest.raises(ConfigError, match=r"importance 'obs' has no Torch-Pruning criterion .*obs_scores"):
        cg._importance("obs")


# ---------------------------------------------------------------------------------------------------
# GFLOPs
# ---------------------------------------------------------------------------------------------------
def _model_info_gflops(backend, model, imgsz, monkeypatch):
    lines = []
    torch_utils = importlib.import_module(backend.prefix + "utils.torch_utils")
    monkeypatch.setattr(backend.general.LOGGER, "info", lines.append)
    torch_utils.model_info(model, imgsz=imgsz)
    return float(re.search(r", ([\d.]+) GFLOPs", lines[-1]).group(1))


@pytest.mark.parametrize("prune", [False, True])
def test_gflops_agrees_with_yolov5_model_info(backend, small_model, monkeypatch, prune):
    model = _pruned(small_model, "model.10.conv", 64) if prune else small_model
    # at 6400 px model_info's one decimal is four significant digits
    assert abs(cg.gflops(model, 6400) - _model_info_gflops(backend, model, 6400, monkeypatch)) <= 0.0505
    assert abs(cg.gflops(model, 640) - _model_info_gflops(backend, model, 640, monkeypatch)) <= 0.0505


def test_gflops_scale_and_drop_after_pruning(small_model):
    g640 = cg.gflops(small_model, 640)
    assert g640 == round(g640, 3)
    assert abs(cg.gflops(small_model, 1280) - 4 * g640) <= 0.0025  # both rounded to 3 decimals
    pruned = _pruned(small_model, "model.10.conv", 64)
    saved_macs = _conv_macs(small_model, 640) - _conv_macs(pruned, 640)
    drop = g640 - cg.gflops(pruned, 640)
    assert drop > 0
    assert drop == pytest.approx(2 * saved_macs / 1e9, rel=0.05)  # FLOPs = 2 x MACs, conv dominated


def test_gflops_leaves_the_model_alone_and_ignores_stale_counter_buffers(small_model):
    keys = set(small_model.state_dict())
    clean = cg.gflops(small_model, 640)
    assert set(small_model.state_dict()) == keys and cg.gflops(small_model, 640) == clean
    for m in small_model.modules():  # what a checkpoint saved after a thop profile carries
        m.register_buffer("total_ops", torch.zeros(1, dtype=torch.float64))
        m.register_buffer("total_params", torch.zeros(1, dtype=torch.float64))
    assert cg.gflops(small_model, 640) == clean
    assert all("total_ops" in m._buffers for m in small_model.modules())  # the model's own buffers untouched


@pytest.mark.parametrize("share", [0.01, 0.25, 0.5, 0.75])
def test_plan_weights_counts_what_pruning_the_plan_leaves(small_model, share):
    """The bisection on the amount counts a plan's weights on the groups instead of pruning a copy: the count is
    exactly the Conv2d weights that really pruning the plan leaves (SPPF's 4x-concat consumer included)."""
    from yolo_prune_plugin.prune.channel import _apply_plan, _plan

    ignored = cg.detect_output_convs(small_model)
    ignored_names = [n for n, m in small_model.named_modules() if m in ignored]
    names = [n for n, _ in conv_layers(small_model) if n not in ignored_names]
    dg, groups = cg._build_groups(small_model, ignored, 64)
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(len(list(grp)[0].idxs), generator=g) for n, grp in groups}
    plan = _plan(scores, int(share * sum(len(s) for s in scores.values())), 8, 0.75, 0.125)
    counted = cg.plan_weights(small_model, groups, dg, plan, names)
    pruned = copy.deepcopy(small_model)
    _apply_plan(pruned, plan, ignored_names, 64)
    assert counted == cg._weights(pruned, names) < cg._weights(small_model, names)
    # a budget search traces once and counts plans on fresh copies of the same model: the same count
    assert cg.plan_weights(copy.deepcopy(small_model), groups, dg, plan, names) == counted


def test_channel_prune_with_a_shared_cache_meets_every_amount_on_fresh_copies(small_model):
    """The budget search's probes: each a fresh copy of the checkpoint's model, one cache (scores, the traced graph)
    for all. Every amount is met as a cold prune meets it (a graph of the first copy counted nothing on the later
    ones, so amounts between the cached trials were 'unreachable')."""
    from yolo_prune_plugin.prune.channel import channel_prune

    cache: dict = {}
    for amount in (0.1, 0.3, 0.2, 0.45):
        shared = channel_prune(copy.deepcopy(small_model), amount, importance="l1", imgsz=64, log=False, cache=cache)
        cold = channel_prune(copy.deepcopy(small_model), amount, importance="l1", imgsz=64, log=False)
        assert abs(shared.achieved - amount) <= 0.02 and shared.achieved == pytest.approx(cold.achieved)
        assert shared.plan == cold.plan


def test_plan_weights_gives_up_on_grouped_convs():
    """A depthwise conv's channels are not counted on the groups (None: the caller prunes a copy instead)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3, groups=8), torch.nn.Conv2d(8, 4, 1))
    dg, groups = cg._build_groups(model, [], 16)
    root = groups[0][0]
    assert cg.plan_weights(model, groups, dg, {root: [0, 1]}, ["0", "1", "2"]) is None
