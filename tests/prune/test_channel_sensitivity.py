"""One-shot channel pruning that keeps the model usable: sensitivity-aware allocation and the structured-OBS choice
(prune/channel_sensitivity.py), reconstruction and mean compensation (prune/reconstruction.py), on real YOLOv5n
modules."""

from __future__ import annotations

import copy
import time

import pytest
import torch


from yolo_prune_plugin.errors import ConfigError
from yolo_prune_plugin.prune.channel import (_build_groups, _importance, channel_counts, channel_prune,
                                             detect_output_convs, round_step)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("amount", [0.5])  # (the shares bind at 0.5; 0.3 runs the same code with slack)
def test_sensitivity_allocation_meets_amount_within_layer_shares(small_model, tiny_images, amount):
    before = channel_counts(small_model)
    ref = copy.deepcopy(small_model)
    t0 = time.perf_counter()
    res = channel_prune(small_model, amount, importance="l1", calibration=tiny_images, allocation="sensitivity",
                        imgsz=64, trace_imgsz=64, log=False)
    elapsed = time.perf_counter() - t0
    assert abs(res.achieved - amount) <= 0.02
    assert res.extra["allocation"] == "sensitivity" and res.extra["sensitivity_layers"] > 0
    # the measurement is part of this call (seconds, not ms): more than nothing, less than the whole call
    assert res.extra["sensitivity_images"] == 4 and 0 < res.extra["sensitivity_seconds"] <= elapsed
    for n, (out_c, _) in channel_counts(small_model).items():
        n0 = before[n][0]
        assert out_c >= n0 * 0.25 - 1e-9 and (out_c == n0 or out_c % round_step(n0, 8) == 0), (n, n0, out_c)
    channel_prune(ref, amount, importance="l1", imgsz=64, log=False)
    assert channel_counts(ref) != channel_counts(small_model)  # measured error, not magnitude, set the counts
    assert small_model.eval()(torch.zeros(1, 3, 64, 64))[0].shape == (1, 252, 8)


def test_sensitivity_curve_is_the_measured_consumer_output_error(small_model, tiny_images):
    """The stem group's score at its m-th channel == relative output error of model.1.conv when the stem's m least
    important channels are zeroed, measured by running the model on the same images."""
    from yolo_prune_plugin.prune.channel_sensitivity import sensitivity_scores

    m = small_model.eval()
    dg, groups = _build_groups(m, detect_output_convs(m), 64)
    imp = _importance("l1")
    scores = {n: imp(g).float() for n, g in groups}
    new, summary = sensitivity_scores(m, groups, dg, scores, tiny_images)
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
                m(tiny_images)
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


@pytest.mark.parametrize("amount", [0.5])
def test_obs_importance_meets_amount_within_layer_shares(small_model, tiny_images, amount):
    before = channel_counts(small_model)
    res = channel_prune(small_model, amount, importance="obs", calibration=tiny_images, imgsz=64, log=False)
    assert abs(res.achieved - amount) <= 0.02 and res.importance == "obs"
    assert res.extra["obs_layers"] > 0 and res.extra["obs_images"] == 4
    for n, (out_c, _) in channel_counts(small_model).items():
        assert out_c >= before[n][0] * 0.25 - 1e-9, n
    assert small_model.eval()(torch.zeros(1, 3, 64, 64))[0].shape == (1, 252, 8)
    with pytest.raises(ConfigError, match="importance 'obs' needs calibration images"):
        channel_prune(copy.deepcopy(small_model), amount, importance="obs", imgsz=64, log=False)


CHANNEL_OPTIONS = [
    {"allocation": "sensitivity", "reconstruct": True, "compensate": True},
    {"importance": "obs"},
    {"importance": "l1", "reconstruct": False, "compensate": True},
]


@pytest.fixture(scope="module")
def through_the_pipeline(backend, _small_model, tiny_data, tmp_path_factory):
    """API -> pipeline with each of the new channel options (ONNX export verified): {index: (entry, source, file)}."""
    from yolo_prune_plugin import api
    from yolo_prune_plugin.config import config_from_dict

    from testkit import save_checkpoint

    out = {}
    for i, channel in enumerate(CHANNEL_OPTIONS):
        src = save_checkpoint(_small_model, tmp_path_factory.mktemp(f"options{i}") / "best.pt")
        cfg = config_from_dict({"structure": "channel", "amount": 0.4, "evaluate": False,
                                "export": ["onnx"] if i == 0 else [],  # one verified export is enough
                                "calibration": {"images": 4}, "channel": channel})
        [entry] = api.prune(src, data=tiny_data, config=cfg, imgsz=64, workers=0)
        out[i] = entry, src, src.with_name("best_pruned.pt")
    return out


@pytest.mark.parametrize("i", range(len(CHANNEL_OPTIONS)))
def test_new_options_through_the_pipeline_reach_the_report_and_export(through_the_pipeline, i):
    """The channel options reach the pruning and the report; BN recalibration is skipped after reconstruction; the
    ONNX export of the first matches the PyTorch outputs (export verification; every file loads in plain YOLOv5
    below)."""
    channel = CHANNEL_OPTIONS[i]
    entry, _, _ = through_the_pipeline[i]
    assert abs(entry.channels["achieved"] - 0.4) <= 0.02
    rec = entry.channels["reconstruction"]
    assert rec["layers"] > 0 and rec["refit"] is channel.get("reconstruct", True)  # default: on with data
    assert rec["compensate"] is channel.get("compensate", False)
    assert entry.channels["importance"] == channel.get("importance", "taylor")
    assert entry.recalibration is None  # the refit / compensated BatchNorm shifts are kept
    if i == 0:
        assert [a["format"] for a in entry.exports] == ["onnx"] and entry.exports[0]["ok"]


def test_new_options_files_load_in_plain_yolov5(through_the_pipeline):
    """Every written file loads in plain YOLOv5's attempt_load (one fresh interpreter for all of them), smaller
    than the dense model."""
    from testkit import plain_attempt_load

    runs = [through_the_pipeline[i] for i in range(len(CHANNEL_OPTIONS))]
    loaded = plain_attempt_load([f for _, _, f in runs])
    for (_, src, _), (shape, widths) in zip(runs, loaded):
        dense = [m.out_channels for m in torch.load(src)["model"].modules() if isinstance(m, torch.nn.Conv2d)]
        assert shape == [1, 252, 8] and sum(widths) < sum(dense)
