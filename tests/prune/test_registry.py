"""prune/registry.py: the pruning methods by name (scope, importance, data-awareness, each bound to an
implementation), unknown names listing the allowed ones, and the option dataclasses' defaults."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from yolo_prune_plugin.prune import registry
from yolo_prune_plugin.prune.registry import (CHANNEL_ALLOCATIONS, CHANNEL_IMPORTANCES, DATA_AWARE_CHANNEL_IMPORTANCES,
                                              METHODS, OBS_ALLOCATIONS, STRUCTURES, ChannelOptions, ChannelRegularize,
                                              MethodSpec, ObsOptions, data_aware_names, get_method, method_names)


def test_method_names_in_order():
    assert method_names() == ("global", "layerwise", "lamp", "obs")
    assert method_names() == tuple(METHODS)


@pytest.mark.parametrize("name, scope, importance, data_aware, opts", [
    ("global", "global", "l1", False, None),
    ("layerwise", "layer", "l1", False, None),
    ("lamp", "global", "lamp", False, None),
    ("obs", "global", "obs", True, ObsOptions),
])
def test_get_method_by_name(name, scope, importance, data_aware, opts):
    m = get_method(name)
    assert isinstance(m, MethodSpec) and m is METHODS[name]
    assert (m.name, m.scope, m.importance, m.data_aware, m.options) == (name, scope, importance, data_aware, opts)
    assert m.summary  # shown in help / docs


@pytest.mark.parametrize("name", ["l2", "Global", "", "auto", None])
def test_unknown_method_lists_allowed(name):
    with pytest.raises(ValueError, match=re.escape(f"method must be one of global, layerwise, lamp, obs; got {name!r}")
                       ) as e:
        get_method(name)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained KeyError in the traceback


def test_data_aware_names_are_the_data_aware_specs():
    assert data_aware_names() == ("obs",)
    assert data_aware_names() == tuple(n for n in method_names() if get_method(n).data_aware)


def test_every_importance_is_bound_to_an_implementation():
    """The registry names importances; prune/unstructured.py binds each (cheap scores, or data-aware masks)."""
    from yolo_prune_plugin.prune.unstructured import DATA_AWARE, SCORERS

    for m in METHODS.values():
        assert m.scope in ("global", "layer"), m.name
        if m.data_aware:
            assert m.importance in DATA_AWARE, m.name
        else:
            assert m.importance in SCORERS, m.name


def test_specs_and_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_method("global").scope = "layer"
    for obj in (ObsOptions(), ChannelOptions(), ChannelRegularize()):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, dataclasses.fields(obj)[0].name, None)


def test_obs_options_defaults():
    o = ObsOptions()
    assert (o.blocksize, o.mask_block, o.damp, o.allocation, o.protect, o.flip, o.batch_size,
            o.samples_per_column, o.steps) == (128, 0, 0.01, "global", (), True, 8, 256, 2)
    assert o.allocation in OBS_ALLOCATIONS


def test_obs_allocations_match_the_allocation_module():
    from yolo_prune_plugin.prune import allocation

    assert set(OBS_ALLOCATIONS) == set(allocation.ALLOCATIONS)


def test_channel_options_defaults():
    c = ChannelOptions()
    assert (c.importance, c.allocation, c.reconstruct, c.regularize) == (None, None, None, None)  # decided per run
    assert (c.round_to, c.round_share, c.max_layer_ratio, c.compensate, c.cost_aware) == (8, 0.125, 0.75, False, 0.0)
    assert (ChannelRegularize().weight, ChannelRegularize().from_epoch) == (0.5, 0)


def test_channel_choices():
    assert STRUCTURES == ("unstructured", "channel")
    assert set(DATA_AWARE_CHANNEL_IMPORTANCES) <= set(CHANNEL_IMPORTANCES)
    assert CHANNEL_ALLOCATIONS == ("global", "sensitivity", "latency")


@pytest.mark.parametrize("has_data, speed, want_reconstruct, want_allocation", [
    (True, False, True, "sensitivity"), (False, False, False, "global"), (True, True, True, "latency"),
    (False, True, False, "latency"),
])
def test_channel_resolved_decides_data_dependent_defaults(has_data, speed, want_reconstruct, want_allocation):
    c = ChannelOptions(round_to=4)
    r = c.resolved(has_data, speed_budget=speed)
    assert (r.reconstruct, r.allocation) == (want_reconstruct, want_allocation)
    assert r.round_to == 4 and r.importance is None  # the rest unchanged
    assert (c.reconstruct, c.allocation) == (None, None)  # a new object; the original is untouched


@pytest.mark.parametrize("has_data", [True, False])
def test_channel_resolved_keeps_explicit_choices(has_data):
    c = ChannelOptions(reconstruct=not has_data, allocation="global" if has_data else "sensitivity")
    assert c.resolved(has_data) == c == c.resolved(has_data, speed_budget=True)


def test_module_stays_free_of_torch():
    """The config validates method names through this module without importing anything heavy."""
    tree = ast.parse(Path(registry.__file__).read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported == {"__future__", "dataclasses", "typing"}
    assert set(registry.__all__) <= set(vars(registry))
