"""prune/allocation.py: per-layer counts for one global amount (exact sums, protected layers, the global threshold)."""

from __future__ import annotations

import pytest
import torch

from yolo_prune_plugin.prune import allocation as alloc
from yolo_prune_plugin.errors import ConfigError
from yolo_prune_plugin.prune.unstructured import conv_layers

# small tensors: one intra-op thread (conftest) avoids oversubscription on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------
# fixtures (``backend`` and ``one_thread`` come from conftest.py)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("allocation", alloc.ALLOCATIONS)
@pytest.mark.parametrize("amount", [0.1, 0.5, 0.93])
@pytest.mark.parametrize("protect", [(), ("model.24.*",)])
def test_layer_counts_sum_exactly(small_yolo, allocation, amount, protect):
    layers = conv_layers(small_yolo)
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(m.weight.shape, generator=g) for _, m in layers] if allocation == "hessian" else None
    counts = alloc.layer_counts(layers, amount, allocation, protect, scores)
    sizes = [m.weight.numel() for _, m in layers]
    assert sum(counts) == round(amount * sum(sizes))
    assert all(0 <= c < s for c, s in zip(counts, sizes))
    if protect:
        assert all(c == 0 for (n, _), c in zip(layers, counts) if n.startswith("model.24."))
    if allocation == "uniform" and not protect:
        assert all(abs(c - amount * s) < 1 for c, s in zip(counts, sizes))


def test_layer_counts_rejects_unknown_allocation_and_missing_scores(small_yolo):
    layers = conv_layers(small_yolo)
    with pytest.raises(ConfigError, match="allocation"):
        alloc.layer_counts(layers, 0.5, "owl")
    with pytest.raises(ConfigError, match="scores"):
        alloc.layer_counts(layers, 0.5, "hessian")
    with pytest.raises(ConfigError, match="protect"):
        alloc.layer_counts(layers, 0.5, protect=("model.*",))


def test_layer_counts_global_matches_magnitude_threshold(small_yolo):
    layers = conv_layers(small_yolo)
    amount = 0.4
    counts = alloc.layer_counts(layers, amount, "global")
    w = torch.cat([m.weight.detach().abs().flatten() for _, m in layers])
    thr = torch.sort(w).values[round(amount * w.numel()) - 1]
    for (_, m), c in zip(layers, counts):
        assert c == int((m.weight.detach().abs() <= thr).sum())  # no ties in random weights
