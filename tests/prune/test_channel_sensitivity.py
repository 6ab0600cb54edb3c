"""One-shot channel pruning that keeps the model usable: sensitivity-aware allocation and the structured-OBS choice
(prune/channel_sensitivity.py), reconstruction and mean compensation (prune/reconstruction.py), on real YOLOv5n
modules."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("torch_pruning")

from yolo_prune_plugin.errors import ConfigError  # noqa: E402
from yolo_prune_plugin.prune.calibration import load_calibration_images  # noqa: E402
from yolo_prune_plugin.prune.channel import (_build_groups, _importance, channel_counts, channel_prune,  # noqa: E402
                                             detect_output_convs, round_step)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tiny_data) -> torch.Tensor:
    return load_calibration_images(tiny_data, 64, n=4)


@pytest.mark.parametrize("amount", [0.3, 0.5])
def test_sensitivity_allocation_meets_amount_within_layer_shares(small_model, images, amount):
    before = channel_counts(small_model)
    ref = copy.deepcopy(small_model)
    res = channel_prune(small_model, amount, importance="l1", calibration=images, allocation="sensitivity",
                        imgsz=64, trace_imgsz=64, log=False)
    assert abs(res.achieved - amount) <= 0.02
    assert res.extra["allocation"] == "sensitivity" and res.extra["sensitivity_layers"] > 0
    assert res.extra["sensitivity_images"] == 4 and res.extra["sensitivity_seconds"] >= 0
    for n, (out_c, _) in channel_counts(small_model).items():
        n0 = before[n][0]
        assert out_c >= n0 * 0.25 - 1e-9 and (out_c == n0 or out_c % round_step(n0, 8) == 0), (n, n0, out_c)
    channel_prune(ref, amount, importance="l1", imgsz=64, log=False)
    assert channel_counts(ref) != channel_counts(small_model)  # measured error, not magnitude, set the counts
    assert small_model.eval()(torch.zeros(1, 3, 64, 64))[0].shape == (1, 252, 8)


def test_sensitivity_curve_is_the_measured_consumer_output_error(small_model, images):
    """The stem group's score at its m-th channel == relative output error of model.1.conv when the stem's m least
    important channels are zeroed, measured by running the model on the same images."""
    from yolo_prune_plugin.prune.channel_sensitivity import sensitivity_scores

    m = small_model.eval()
    dg, groups = _build_groups(m, detect_output_convs(m), 64)
    imp = _importance("l1")
    scores = {n: imp(g).float() for n, g in groups}
    new, summary = sensitivity_scores(m, groups, dg, scores, images)
    assert summary["sensitivity_unmeasured"] == 0 and set(new) == set(scores)
    s = scores["model.0.conv"]
    order = torch.sort(s, stable=True).indices
    assert torch.equal(torch.sort(new["model.0.conv"], stable=True).indices, order)  # same order inside the group

    def consumer_out(zero: torch.Tensor) -> torch.Tensor:
        outs = []
        h0 = m.model[0].register_forward_hook(lambda mod, i, o: o.index_fill(1, zero, 0.0))
        h1 = m.model[1].conv.register_forward_hook(lambda mod, i, o: outs.append(o))
        try:
            with torch.no_grad():
                m(images)
        finally:
            h0.remove()
            h1.remove()
        return outs[0].double()

    y = consumer_out(torch.tensor([], dtype=torch.long))
    for k in (1, 4, 8):
        err = float((consumer_out(order[:k]) - y).pow(2).sum() / y.pow(2).sum())
        assert new["model.0.conv"][order[k - 1]].item() == pytest.approx(err, rel=1e-3, abs=1e-6)


def test_sensitivity_needs_calibration_and_known_allocation(small_model):
    with pytest.raises(ConfigError, match="needs calibration images"):
        channel_prune(small_model, 0.3, allocation="sensitivity", imgsz=64, log=False)
    with pytest.raises(ConfigError, match="allocation 'xyz' is unknown; expected one of global, sensitivity"):
        channel_prune(small_model, 0.3, allocation="xyz", imgsz=64, log=False)


@pytest.mark.parametrize("cfg,match", [
    ({"channel": {"allocation": "best"}}, "'channel.allocation' must be one of global, sensitivity"),
    ({"structure": "channel", "channel": {"allocation": "sensitivity"}, "schedule": {"final_amount": 0.3}},
     "one-shot"),
])
def test_bad_allocation_configs(cfg, match):
    from yolo_prune_plugin.config import config_from_dict

    with pytest.raises(ConfigError, match=match):
        config_from_dict(cfg)


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

    images = coco_images
    small_model = copy.deepcopy(yolov5n)
    dense, res = _pruned_pair(small_model)
    none = copy.deepcopy(small_model)
    state = {k: v.clone() for k, v in small_model.state_dict().items()}
    info = reconstruct_layers(small_model, dense, images, kept=res.kept, positions=4096)
    refit = sorted(info["errors"])
    dc, pc = channel_counts(dense), channel_counts(small_model)
    assert refit == sorted(n for n in pc if pc[n][1] != dc[n][1]) and len(refit) > 10
    ref, rec, raw = (_conv_outputs(m, refit, images) for m in (dense, small_model, none))
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


def test_compensation_preserves_the_consumers_mean_output(small_model, images):
    """Only the stem loses channels: its consumer (model.1) keeps its weights, and its BatchNorm output has the dense
    model's per-channel mean on the calibration images (not without compensation)."""
    from yolo_prune_plugin.prune.reconstruction import reconstruct_layers

    dense, res = _pruned_pair(small_model, 0.25, include=("model.0.conv",), round_to=1)
    assert channel_counts(small_model)["model.0.conv"][0] < 16
    w = small_model.model[1].conv.weight.clone()
    bn_out = lambda m: _conv_outputs(m, ["model.1.bn"], images)["model.1.bn"].mean((0, 2, 3))  # noqa: E731
    before = bn_out(small_model)
    info = reconstruct_layers(small_model, dense, images, kept=res.kept, refit=False, compensate=True,
                              positions=10 ** 6)
    assert info["layers"] == 1 and torch.equal(small_model.model[1].conv.weight, w)
    target, after = bn_out(dense), bn_out(small_model)
    assert torch.allclose(after, target, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(before, target, atol=1e-3)


def test_obs_removes_a_redundant_channel_first_and_its_refit_is_exact():
    """Structured OBS on one consumer: input channel 2 = channel 0 + channel 1, so any one of the three carries nothing
    the other two do not, while channel 3 (the smallest weights: magnitude would remove it first) is the only one
    that cannot be replaced. OBS prices 0-2 at ~0 and 3 highest; after removing channel 2 the compensated weights
    reproduce the consumer's output on the same data."""
    from yolo_prune_plugin.prune.channel_sensitivity import _ObsConsumer
    from yolo_prune_plugin.prune.obs import layer_hessian

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 5, 3, padding=1, bias=False)
    x = torch.randn(16, 4, 12, 12)
    x[:, 2] = x[:, 0] + x[:, 1]
    with torch.no_grad():
        conv.weight[:, 3] *= 0.2
    H = layer_hessian(conv, x)
    st = _ObsConsumer(conv, H, torch.zeros(4, dtype=torch.float64), damp=1e-8)
    costs = st.costs()
    l1 = conv.weight.detach().abs().sum((0, 2, 3))
    assert int(torch.argmin(l1)) == 3 and int(torch.argmax(costs)) == 3
    assert float(costs[:3].max()) < 1e-6 < float(costs[3])
    st.remove(2)
    refit = torch.nn.functional.conv2d(x, st.W.float().view_as(conv.weight), padding=1)
    with torch.no_grad():
        dense = conv(x)
    assert float((refit - dense).abs().max() / dense.abs().max()) < 1e-3
    assert torch.isinf(st.costs()[2]) and not st.W.view(5, 4, 9)[:, 2].any()


@pytest.mark.parametrize("amount", [0.3, 0.5])
def test_obs_importance_meets_amount_within_layer_shares(small_model, images, amount):
    before = channel_counts(small_model)
    res = channel_prune(small_model, amount, importance="obs", calibration=images, imgsz=64, log=False)
    assert abs(res.achieved - amount) <= 0.02 and res.importance == "obs"
    assert res.extra["obs_layers"] > 0 and res.extra["obs_images"] == 4
    for n, (out_c, _) in channel_counts(small_model).items():
        assert out_c >= before[n][0] * 0.25 - 1e-9, n
    assert small_model.eval()(torch.zeros(1, 3, 64, 64))[0].shape == (1, 252, 8)
    with pytest.raises(ConfigError, match="importance 'obs' needs calibration images"):
        channel_prune(copy.deepcopy(small_model), amount, importance="obs", imgsz=64, log=False)


@pytest.mark.parametrize("channel", [
    {"allocation": "sensitivity", "reconstruct": True, "compensate": True},
    {"importance": "obs"},
    {"importance": "l1", "reconstruct": False, "compensate": True},
])
def test_new_options_through_the_pipeline_load_in_plain_yolov5_and_export(small_ckpt, tiny_data, channel):
    """API -> pipeline with the new channel options: the file loads in plain YOLOv5 attempt_load and its ONNX export
    matches the PyTorch outputs (export verification); BN recalibration is skipped after reconstruction."""
    from testkit import plain_attempt_load
    from yolo_prune_plugin import api
    from yolo_prune_plugin.config import config_from_dict

    cfg = config_from_dict({"structure": "channel", "amount": 0.4, "evaluate": False, "export": ["onnx"],
                            "calibration": {"images": 4}, "channel": channel})
    [entry] = api.prune(small_ckpt, data=tiny_data, config=cfg, imgsz=64, workers=0)
    assert abs(entry.channels["achieved"] - 0.4) <= 0.02
    rec = entry.channels["reconstruction"]
    assert rec["layers"] > 0 and rec["refit"] is channel.get("reconstruct", True)  # default: on with data
    assert rec["compensate"] is channel.get("compensate", False)
    assert entry.channels["importance"] == channel.get("importance", "taylor")
    assert entry.recalibration is None  # the refit / compensated BatchNorm shifts are kept
    assert [a["format"] for a in entry.exports] == ["onnx"] and entry.exports[0]["ok"]
    shape, widths = plain_attempt_load(small_ckpt.with_name("best_pruned.pt"))
    dense = [m.out_channels for m in torch.load(small_ckpt)["model"].modules() if isinstance(m, torch.nn.Conv2d)]
    assert shape == [1, 252, 8] and sum(widths) < sum(dense)
