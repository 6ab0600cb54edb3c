"""prune/reconstruction.py: least-squares refit of the layers whose inputs lost channels, and mean compensation of the removed channels, on real YOLOv5n modules."""

from __future__ import annotations

import copy

import pytest
import torch


from yolo_prune_plugin.prune.calibration import load_calibration_images
from yolo_prune_plugin.prune.channel import (channel_counts, channel_prune,
                                             )

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv_outputs(model: torch.nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named conv's output (before BatchNorm) on ``x``."""
    mods, out = dict(model.named_modules()), {}
    hs = [mods[n].register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o.double())) for n in names]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hs:
            h.remove()
    return out


def _pruned_pair(model, amount=0.4, **kw):
    dense = copy.deepcopy(model).eval()
    res = channel_prune(model, amount, importance="l1", imgsz=64, log=False, **kw)
    return dense, res


@pytest.fixture(scope="module")
def coco_images(coco8_yaml) -> torch.Tensor:
    return load_calibration_images(coco8_yaml, 128, n=8)


def test_reconstruction_lowers_every_refit_layers_error_and_leaves_the_rest(yolov5n, coco_images):
    """Trained yolov5n, real images: each refit layer's output on the calibration images is closer to the dense
    model's than without reconstruction; convs whose inputs kept all channels are untouched."""
    from yolo_prune_plugin.prune.reconstruction import reconstruct_layers

    small_model = copy.deepcopy(yolov5n)
    dense, res = _pruned_pair(small_model)
    none = copy.deepcopy(small_model)
    state = {k: v.clone() for k, v in small_model.state_dict().items()}
    info = reconstruct_layers(small_model, dense, coco_images, kept=res.kept, positions=4096)
    refit = sorted(info["errors"])
    dc, pc = channel_counts(dense), channel_counts(small_model)
    assert refit == sorted(n for n in pc if pc[n][1] != dc[n][1]) and len(refit) > 10
    ref, rec, raw = (_conv_outputs(m, refit, coco_images) for m in (dense, small_model, none))
    for n in refit:
        keep = torch.as_tensor(res.kept[n]) if n in res.kept else slice(None)
        y = ref[n][:, keep]
        err = lambda o: float((o - y).pow(2).sum() / y.pow(2).sum())  # noqa: E731
        assert err(rec[n]) < err(raw[n]), f"{n}: reconstruction {err(rec[n]):.4f} >= none {err(raw[n]):.4f}"
    changed = {k.rsplit(".", 1)[0] for k, v in small_model.state_dict().items() if not torch.equal(v, state[k])}
    owners = {n for n in refit} | {n.rsplit(".", 1)[0] + ".bn" for n in refit}
    assert changed and changed <= owners, changed - owners  # only refit convs (and their BN shift) changed


@pytest.mark.parametrize("damp", [0.1])
def test_refit_keeps_the_weights_when_the_removed_channels_carried_nothing(yolov5n, coco_images, damp):
    """The ridge pulls toward the kept weights, not toward zero: where the removed channels output exactly 0 (what
    channel.regularize trains toward), the kept weights already reproduce the dense outputs, and the refit returns
    them unchanged at any dampening (a ridge toward zero would shrink them all)."""
    from yolo_prune_plugin.prune.reconstruction import reconstruct_layers

    model = copy.deepcopy(yolov5n).eval()
    probe = copy.deepcopy(model)
    res = channel_prune(probe, 0.3, importance="l1", imgsz=128, log=False)
    mods = dict(model.named_modules())
    with torch.no_grad():  # the channels the prune removes go dead in the dense model: gamma = beta = 0
        for conv, kept in res.kept.items():
            bn = mods[conv.rsplit(".", 1)[0] + ".bn"]
            gone = sorted(set(range(bn.num_features)) - set(kept))
            bn.weight[gone] = 0.0
            bn.bias[gone] = 0.0
    dense = copy.deepcopy(model)
    channel_prune(model, 0.3, plan=res.plan, imgsz=128, log=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    info = reconstruct_layers(model, dense, coco_images, kept=res.kept, damp=damp, compensate=False)
    assert info["layers"] > 10 and max(info["errors"].values()) < 1e-6
    for k, v in model.state_dict().items():
        assert torch.allclose(v, state[k], atol=1e-4, rtol=1e-4), k


def test_compensation_preserves_the_consumers_mean_output(small_model, tiny_images):
    """Only the stem loses channels: its consumer (model.1) keeps its weights, and its BatchNorm output has the dense
    model's per-channel mean on the calibration images (not without compensation)."""
    from yolo_prune_plugin.prune.reconstruction import reconstruct_layers

    dense, res = _pruned_pair(small_model, 0.25, include=("model.0.conv",), round_to=1)
    assert channel_counts(small_model)["model.0.conv"][0] < 16
    w = small_model.model[1].conv.weight.clone()
    bn_out = lambda m: _conv_outputs(m, ["model.1.bn"], tiny_images)["model.1.bn"].mean((0, 2, 3))  # noqa: E731
    before = bn_out(small_model)
    info = reconstruct_layers(small_model, dense, tiny_images, kept=res.kept, refit=False, compensate=True,
                              positions=10 ** 6)
    assert info["layers"] == 1 and torch.equal(small_model.model[1].conv.weight, w)
    target, after = bn_out(dense), bn_out(small_model)
    assert torch.allclose(after, target, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(before, target, atol=1e-3)


def test_reconstruction_brings_outputs_closer_to_the_dense_model(yolov5n):
    from yolo_prune_plugin.prune.reconstruction import reconstruct_layers

    dense = yolov5n
    small_model = copy.deepcopy(yolov5n)
    res = channel_prune(small_model, 0.3, imgsz=64, log=False)
    counts = channel_counts(small_model)
    assert res.kept and all(len(v) == counts[n][0] for n, v in res.kept.items())
    g = torch.Generator().manual_seed(1)
    fit, check = torch.rand(8, 3, 128, 128, generator=g), torch.rand(4, 3, 128, 128, generator=g)
    def raw(m):  # Detect's raw output maps (logits), before its sigmoid and grid decoding
        return torch.cat([t.flatten() for t in m(check)[1]])

    with torch.no_grad():
        ref = raw(dense)
        err_before = (raw(small_model.eval()) - ref).pow(2).mean()
        info = reconstruct_layers(small_model, dense, fit, positions=64, kept=res.kept)
        err_after = (raw(small_model) - ref).pow(2).mean()
    refit = {n for n, (_, cin) in counts.items() if cin != channel_counts(dense)[n][1]}
    assert info["layers"] == len(refit) == len(info["errors"]) and channel_counts(small_model) == counts
    assert err_after < 0.7 * err_before
