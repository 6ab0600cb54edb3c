"""prune/channel.py: Torch-Pruning channel pruning of real YOLOv5 models, and keeping the pruned architecture in training."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch


from yolo_prune_plugin.backend.training_loop import is_channel_pruned, keep_checkpoint_architecture
from yolo_prune_plugin.backend.loading import load_checkpoint
from yolo_prune_plugin.errors import ConfigError, PruneError
from yolo_prune_plugin.prune.unstructured import conv_layers
from yolo_prune_plugin.prune.channel import channel_counts, channel_prune, detect_output_convs
from yolo_prune_plugin.prune.calibration import load_calibration_batch

from testkit import assert_dense_slices, plain_attempt_load, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _check_structure(before: dict, model: torch.nn.Module, round_to: int, scope: set[str]) -> int:
    """Every conv has channels; pruned out-channel counts are multiples of the layer's rounding step (round_to, or a
    divisor of it on narrow layers); out-of-scope/Detect unchanged."""
    from yolo_prune_plugin.prune.channel import round_step

    after = channel_counts(model)
    assert after.keys() == before.keys()
    changed = 0
    detect = {n for n, m in model.named_modules() if any(m is d for d in detect_output_convs(model))}
    for n, (out_c, in_c) in after.items():
        assert out_c >= 1 and in_c >= 1, n
        if out_c != before[n][0]:
            changed += 1
            assert n in scope and n not in detect, f"{n} lost output channels but is out of scope"
            step = round_step(before[n][0], round_to)
            assert out_c % step == 0, f"{n}: {out_c} channels, not a multiple of {step}"
    return changed


@pytest.mark.parametrize("amount,importance,round_to", [(0.3, "l1", 8), (0.5, "l1", 8), (0.5, "l2", 1),
                                                       (0.2, "bn", 4), (0.4, "lamp", 8)])
def test_amount_is_met_and_structure_is_valid(small_model, amount, importance, round_to):
    before = channel_counts(small_model)
    dense = copy.deepcopy(small_model)
    res = channel_prune(small_model, amount, importance=importance, round_to=round_to, imgsz=64, log=False)
    assert abs(res.achieved - amount) <= 0.02
    assert assert_dense_slices(small_model, dense, res.kept) > 0  # the dense weights, sliced; not re-initialised
    weights_now = sum(m.weight.numel() for _, m in conv_layers(small_model))
    assert weights_now == res.conv_weights_after  # no include/exclude: every Conv2d is in scope
    assert res.params_after < res.params_before and res.gflops_after < res.gflops_before
    assert _check_structure(before, small_model, round_to, set(before)) > 0
    y = small_model.eval()(torch.zeros(1, 3, 64, 64))[0]
    assert y.shape == (1, 252, 8)  # 3 anchors x (8x8 + 4x4 + 2x2) x (5 + 3 classes): the head is intact
    assert is_channel_pruned(small_model)


def test_slice_check_catches_a_model_reinitialised_at_the_pruned_widths(small_model):
    """Control for assert_dense_slices: the right widths with fresh weights are not a pruned dense model."""
    dense = copy.deepcopy(small_model)
    res = channel_prune(small_model, 0.3, imgsz=64, log=False)
    torch.manual_seed(1)
    widths = dict(dense.named_modules())
    for n, m in small_model.named_modules():  # fresh weights wherever the widths changed
        if isinstance(m, torch.nn.Conv2d) and m.weight.shape != widths[n].weight.shape:
            m.reset_parameters()
    with pytest.raises(AssertionError, match="holds no dense input channel"):
        assert_dense_slices(small_model, dense, res.kept)


def test_real_yolov5n_amount_and_gflops(yolov5n):
    m = copy.deepcopy(yolov5n)
    res = channel_prune(m, 0.5, log=False)
    assert abs(res.achieved - 0.5) <= 0.02
    assert res.gflops_after < 0.6 * res.gflops_before
    assert not is_channel_pruned(yolov5n) and is_channel_pruned(m)


def test_include_exclude_restrict_output_channels(small_model):
    before = channel_counts(small_model)
    exclude = ("model.0.*", "model.2.*")
    res = channel_prune(small_model, 0.3, exclude=exclude, round_to=4, imgsz=64, log=False)
    scope = {n for n, _ in conv_layers(small_model, exclude=exclude)}
    assert _check_structure(before, small_model, 4, scope) > 0
    assert channel_counts(small_model)["model.0.conv"] == before["model.0.conv"]
    assert abs(res.achieved - 0.3) <= 0.02


@pytest.mark.parametrize("kwargs,match", [({"amount": 1.2}, "amount"), ({"importance": "xyz"}, "importance"),
                                          ({"round_to": 0}, "round_to"), ({"importance": "taylor"}, "calibration"),
                                          ({"cost_aware": -1.0}, "cost_aware"), ({"cost_aware": "yes"}, "cost_aware"),
                                          ({"exclude": ("nomatch*",)}, "matches no Conv2d")])
def test_bad_arguments_are_clear_errors(small_model, kwargs, match):
    kw = {"amount": 0.3, **kwargs}
    with pytest.raises(ConfigError, match=match):
        channel_prune(small_model, kw.pop("amount"), **kw)


def test_unreachable_amount_is_refused(small_model):
    with pytest.raises(PruneError, match="cannot remove"):
        channel_prune(small_model, 0.95, max_layer_ratio=0.5, imgsz=64, log=False)


@pytest.fixture(scope="module")
def syn_data(tmp_path_factory) -> Path:
    from yolo_prune_plugin.tools import synthetic

    return synthetic.make_dataset(tmp_path_factory.mktemp("syn"), n_train=4, n_val=2, imgsz=64)


def test_taylor_uses_yolov5_loss_on_labelled_train_images(small_model, syn_data):
    images, targets = load_calibration_batch(syn_data, 64, n=4)
    assert images.shape == (4, 3, 64, 64) and targets.shape[1] == 6 and len(targets) > 0
    assert set(targets[:, 0].long().tolist()) <= {0, 1, 2, 3}
    ref = copy.deepcopy(small_model)
    res = channel_prune(small_model, 0.3, importance="taylor", calibration=(images, targets), imgsz=64, log=False)
    assert res.extra["calibration_loss"] > 0 and abs(res.achieved - 0.3) <= 0.02
    assert assert_dense_slices(small_model, ref, res.kept) > 0
    assert all(p.grad is None for p in small_model.parameters())
    channel_prune(ref, 0.3, importance="l1", imgsz=64, log=False)
    assert channel_counts(ref) != channel_counts(small_model)  # the data changed the ranking


def test_loss_gradients_leave_weights_and_bn_statistics_unchanged(small_model, syn_data):
    from yolo_prune_plugin.prune.calibration import accumulate_loss_gradients

    state = {k: v.clone() for k, v in small_model.state_dict().items()}
    loss = accumulate_loss_gradients(small_model, *load_calibration_batch(syn_data, 64, n=4), batch_size=2)
    assert loss > 0 and not small_model.training and not hasattr(small_model, "hyp")
    assert all(torch.equal(v, state[k]) for k, v in small_model.state_dict().items())
    assert small_model.model[0].conv.weight.grad is not None and small_model.model[0].conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("own_hyp", [False, True])
def test_loss_gains_are_scaled_once(backend, small_model, syn_data, monkeypatch, own_hyp):
    """train.py scales box/cls/obj by nl, nc/80 and (imgsz/640)^2 and saves that hyp with the model: a
    checkpoint's ``model.hyp`` is used as it is; only the default hyp file is scaled (here nc=3, 64 px)."""
    import importlib

    from yolo_prune_plugin.prune.calibration import accumulate_loss_gradients

    loss_mod = importlib.import_module(backend.prefix + "utils.loss")
    seen = []

    class Spy(loss_mod.ComputeLoss):
        def __init__(self, model, *a, **k):
            super().__init__(model, *a, **k)
            seen.append({k: self.hyp[k] for k in ("box", "cls", "obj")})

    monkeypatch.setattr(loss_mod, "ComputeLoss", Spy)
    nl, nc, imgsz = 3, 3, 64
    assert (small_model.model[-1].nl, small_model.model[-1].nc) == (nl, nc)
    trained = {"box": 0.05 * 3 / nl, "cls": 0.5 * nc / 80 * 3 / nl, "obj": 1.0 * (imgsz / 640) ** 2 * 3 / nl}
    if own_hyp:  # as train.py left it in the checkpoint (already scaled), with the other keys of the hyp file
        from yolo_prune_plugin.prune.calibration import _default_hyp

        small_model.hyp = {**_default_hyp(), **trained}
    accumulate_loss_gradients(small_model, *load_calibration_batch(syn_data, imgsz, n=2))
    assert seen == [pytest.approx(trained)]
    assert (small_model.hyp["cls"] == trained["cls"]) if own_hyp else not hasattr(small_model, "hyp")


@pytest.fixture(scope="module")
def pruned_ckpt(_small_model, tmp_path_factory) -> tuple[Path, dict]:
    """yolov5n (3 classes) channel-pruned 50 % and saved as YOLOv5 saves it, once for the tests that read it."""
    model = copy.deepcopy(_small_model)
    channel_prune(model, 0.5, imgsz=64, log=False)
    return save_checkpoint(model.eval(), tmp_path_factory.mktemp("pruned") / "pruned.pt"), channel_counts(model)


def test_export_of_channel_pruned_file_matches_and_is_smaller(backend, small_ckpt, pruned_ckpt):
    from yolo_prune_plugin.backend.export import export_and_verify

    path, _ = pruned_ckpt
    [rep] = export_and_verify(path, ["onnx"], imgsz=64)
    assert rep.ok and rep.written, rep.message
    [dense] = export_and_verify(small_ckpt, ["onnx"], imgsz=64)
    assert dense.ok and rep.bytes < 0.6 * dense.bytes


def test_plain_yolov5_attempt_load_without_the_plugin(pruned_ckpt):
    """A fresh interpreter that never imports the plugin (no allow-list: YOLOv5 as users run it)."""
    path, counts = pruned_ckpt
    shape, widths = plain_attempt_load(path)
    assert shape[1] == 252
    assert widths == [c[0] for c in counts.values()]  # fused: one conv per conv, same widths


def _opt(backend, data, project):
    from yolo_prune_plugin.api import train_opt

    return train_opt([], backend, data=str(data), weights="", imgsz=64, epochs=1, batch_size=4, device="cpu",
                     workers=0, noplots=True, noautoanchor=True, project=str(project), name="base")


def test_finetune_keeps_channel_counts_and_yolov5_alone_would_reinit(backend, pruned_ckpt, syn_data, tmp_path):
    from yolo_prune_plugin.training.finetune import finetune_checkpoint

    path, counts = pruned_ckpt
    base = _opt(backend, syn_data, tmp_path)
    orig_model = backend.train.Model
    with keep_checkpoint_architecture(backend, path):
        assert backend.train.Model is not orig_model
        ft = finetune_checkpoint(path, base, 1, masks=None, project=tmp_path, name="keep", backend=backend)
    assert backend.train.Model is orig_model
    trained = load_checkpoint(ft.last)["model"]
    assert channel_counts(trained) == counts
    assert is_channel_pruned(trained)
    before = load_checkpoint(path)["model"]
    assert any(not torch.equal(a.float(), b.float()) for a, b in zip(trained.parameters(), before.parameters()))
    # control: YOLOv5 on its own rebuilds the YAML at full width and drops every mismatched tensor
    plain = finetune_checkpoint(path, base, 1, masks=None, project=tmp_path, name="plain", backend=backend)
    widths = channel_counts(load_checkpoint(plain.last)["model"])
    assert widths != counts and not is_channel_pruned(load_checkpoint(plain.last)["model"])


def test_keep_architecture_refuses_other_class_count_and_restores(backend, pruned_ckpt):
    path, _ = pruned_ckpt
    orig = backend.train.Model
    with pytest.raises(PruneError, match="3 classes but the dataset 80"):
        with keep_checkpoint_architecture(backend, path):
            backend.train.Model("x.yaml", ch=3, nc=80)
    assert backend.train.Model is orig


def test_default_importance_is_taylor_with_calibration_else_l1(small_model, syn_data):
    m2 = copy.deepcopy(small_model)
    assert channel_prune(small_model, 0.3, imgsz=64, log=False).importance == "l1"
    cal = load_calibration_batch(syn_data, 64, n=4)
    assert channel_prune(m2, 0.3, calibration=cal, imgsz=64, log=False).importance == "taylor"


def test_cost_aware_ranking_keeps_amount_and_removes_more_flops(small_model):
    """At 50 %, cost_aware 0.5 and 1.0 against the plain ranking (computed once)."""
    plain = copy.deepcopy(small_model)
    ref = channel_prune(plain, 0.5, imgsz=64, log=False)
    for cost_aware in (0.5, 1.0):
        model = copy.deepcopy(small_model)
        res = channel_prune(model, 0.5, cost_aware=cost_aware, imgsz=64, log=False)
        assert abs(res.achieved - 0.5) <= 0.02 and res.extra["cost_aware"] == cost_aware
        assert res.gflops_after <= ref.gflops_after, (cost_aware, res.gflops_after, ref.gflops_after)
        assert channel_counts(plain) != channel_counts(model)  # the cost changed the ranking
        # the stem (6x6 conv at half resolution: the most MACs per weight) loses at least as much as before
        assert channel_counts(model)["model.0.conv"][0] <= channel_counts(plain)["model.0.conv"][0]
        assert model.eval()(torch.zeros(1, 3, 64, 64))[0].shape == (1, 252, 8)


def test_channel_macs_counts_the_root_and_its_consumers(small_model):
    from yolo_prune_plugin.prune.channel import _build_groups, channel_macs

    dg, groups = _build_groups(small_model, detect_output_convs(small_model), 64)
    macs = channel_macs(small_model, groups, dg, 64)
    stem, nxt = small_model.model[0].conv, small_model.model[1].conv  # 3->16 6x6/2 (32x32), 16->32 3x3/2 (16x16)
    assert (stem.in_channels, stem.out_channels, nxt.out_channels) == (3, 16, 32)
    assert macs["model.0.conv"] == 3 * 6 * 6 * 32 * 32 + 32 * 3 * 3 * 16 * 16
    assert len(macs) == len(groups) and min(macs.values()) > 0


@pytest.mark.parametrize("round_to,width,step", [(8, 16, 2), (8, 32, 4), (8, 64, 8), (8, 24, 2), (8, 4, 1),
                                                 (1, 16, 1), (6, 16, 2)])
def test_round_step_is_a_small_share_of_the_layer(round_to, width, step):
    from yolo_prune_plugin.prune.channel import round_step

    assert round_step(width, round_to, 0.125) == step
    assert round_step(width, round_to, 1.0) == (round_to if width >= round_to else 4)  # never above the width


@pytest.mark.parametrize("amount", [0.1, 0.6])  # a small amount, and one where the layer shares bind
def test_allocation_respects_layer_shares_and_meets_amount(small_model, amount):
    """yolov5n from its YAML: every group loses at most max_layer_ratio of its channels, kept counts are multiples
    of a rounding step of at most round_share of the layer (a 16-channel stem never moves 8 at once), amount +-2 pp."""
    from yolo_prune_plugin.prune.channel import round_step

    before = channel_counts(small_model)
    res = channel_prune(small_model, amount, importance="l1", round_to=8, max_layer_ratio=0.75, round_share=0.125,
                        imgsz=64, log=False)
    assert abs(res.achieved - amount) <= 0.02
    for n, (out_c, _) in channel_counts(small_model).items():
        n0 = before[n][0]
        assert out_c >= n0 * (1 - 0.75) - 1e-9, f"{n}: {n0} -> {out_c} removes more than 75 %"
        if out_c != n0:
            step = round_step(n0, 8, 0.125)
            assert step <= max(1, 0.125 * n0) and out_c % step == 0, f"{n}: {n0} -> {out_c} (step {step})"
