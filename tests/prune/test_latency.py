"""prune/latency.py: the per-layer latency table (ONNX Runtime), its cache, and what a channel of each group costs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from yolo_prune_plugin.prune import channel_groups as cg
from yolo_prune_plugin.prune.latency import _conv_graph, channel_latency, conv_inputs, latency_table

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("cin, cout, k, s, pad", [(3, 16, 6, 2, 2), (32, 8, 1, 1, 0), (16, 16, 3, 2, 1)])
def test_the_timed_graph_is_a_conv_with_silu_of_the_layer_shape(cin, cout, k, s, pad):
    import onnxruntime as ort

    sess = ort.InferenceSession(_conv_graph(cin, cout, k, s, pad), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, cin, 32, 32)).astype(np.float32)
    [y] = sess.run(None, {"x": x})
    conv = torch.nn.Conv2d(cin, cout, k, s, pad)
    assert y.shape == tuple(conv(torch.from_numpy(x)).shape)
    assert (y >= -0.2785).all()  # SiLU's minimum: the activation is in the graph


def test_table_is_measured_once_and_read_back_from_its_cache(small_model, tmp_path):
    """Every ungrouped conv (Detect's included) has its shape and slopes; a second call with the same cache file
    times nothing; another input size is measured again."""
    cache = tmp_path / "latency_64.json"
    hw = conv_inputs(small_model, 64)
    convs = [n for n, m in small_model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    first = latency_table(small_model, 64, cache=cache)
    assert sorted(first["layers"]) == sorted(convs) and first["measured"] == 3 * len(convs)
    row = first["layers"]["model.0.conv"]
    assert row["shape"] == [3, 16, 6, 2, 2, *hw["model.0.conv"]] and hw["model.0.conv"] == (64, 64)
    assert row["ms"] > 0 and row["per_out"] >= 0 and row["per_in"] >= 0
    again = latency_table(copy.deepcopy(small_model), 64, cache=cache)
    assert again["measured"] == 0 and again["layers"] == first["layers"]
    assert json.loads(cache.read_text())["key"]["imgsz"] == 64
    assert latency_table(small_model, 96, cache=cache, names=["model.0.conv"])["measured"] == 3


def test_a_groups_channel_costs_its_members_output_and_consumers_input_slopes(small_model):
    """With every conv's output slope 1 ms and input slope 10 ms per channel, a group costs 1 per conv whose output
    channels go and 10 per consumer: model.0's channel is model.0.conv's output and model.1.conv's input."""
    ignored = cg.detect_output_convs(small_model)
    dg, groups = cg._build_groups(small_model, ignored, 64)
    table = {"layers": {n: {"per_out": 1.0, "per_in": 10.0} for n, m in small_model.named_modules()
                        if isinstance(m, torch.nn.Conv2d)}}
    cost = channel_latency(small_model, groups, dg, table)
    assert cost["model.0.conv"] == 11.0
    assert set(cost) == {n for n, _ in groups} and all(v >= 1.0 for v in cost.values())


def test_latency_allocation_meets_the_amount_and_counts_its_measurements(small_model, tmp_path):
    """``allocation: latency`` without images (L1 per millisecond): the amount is met, every layer keeps at least
    the configured share, the table is measured once for a search (shared cache) and not at all when its file
    exists."""
    from yolo_prune_plugin.prune.channel import channel_counts, channel_prune

    before = channel_counts(small_model)
    cache: dict = {}
    file = tmp_path / "latency_64.json"
    results = [channel_prune(copy.deepcopy(small_model), a, importance="l1", imgsz=64, log=False, cache=cache,
                             allocation="latency", latency_cache=file, max_layer_ratio=0.75) for a in (0.3, 0.5)]
    for r, a in zip(results, (0.3, 0.5)):
        assert abs(r.achieved - a) <= 0.02 and r.extra["latency"]["measured"] > 0  # the one measurement, reported
    assert results[0].extra["latency"] is results[1].extra["latency"]  # scored once for both amounts
    m = copy.deepcopy(small_model)
    cold = channel_prune(m, 0.5, importance="l1", imgsz=64, log=False, allocation="latency", latency_cache=file)
    assert cold.extra["latency"]["measured"] == 0 and cold.plan == results[1].plan
    for n, (out_c, _) in channel_counts(m).items():
        assert out_c >= before[n][0] * 0.25 - 1e-9, n
