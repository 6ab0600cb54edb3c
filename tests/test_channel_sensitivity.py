"""prune/channel_sensitivity.py: sensitivity-aware allocation measured on calibration images (real YOLOv5n)."""

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
