"""options.py: the option sections of PruneConfig (frozen dataclasses): their defaults (off where documented),
BNRecalibrationOptions.count, TargetOptions.active, and how config.py validates each section's keys."""

from __future__ import annotations

import dataclasses
import re

import pytest

from yolo_prune_plugin import options
from yolo_prune_plugin.config import PruneConfig, config_from_dict
from yolo_prune_plugin.errors import ConfigError
from yolo_prune_plugin.options import (TARGET_RUNTIMES, TARGET_SIZES, BNRecalibrationOptions, CalibrationOptions,
                                       ExportOptions, FinetuneOptions, ScheduleOptions, SweepOptions, TargetOptions)
from yolo_prune_plugin.prune.registry import method_names

#: config key -> section dataclass (the sections this module defines)
SECTIONS = {"export_options": ExportOptions, "calibration": CalibrationOptions, "sweep": SweepOptions,
            "finetune": FinetuneOptions, "schedule": ScheduleOptions, "bn_recalibration": BNRecalibrationOptions,
            "target": TargetOptions}


def test_every_section_of_the_module_is_a_config_key():
    defined = {n for n, c in vars(options).items() if dataclasses.is_dataclass(c) and c.__module__ == options.__name__}
    assert defined == {c.__name__ for c in SECTIONS.values()}
    fields = {f.name: f for f in dataclasses.fields(PruneConfig)}
    for key, cls in SECTIONS.items():
        assert fields[key].default_factory is cls  # PruneConfig's defaults are the sections' defaults
        assert getattr(PruneConfig(), key) == cls()


@pytest.mark.parametrize("cls", SECTIONS.values(), ids=lambda c: c.__name__)
def test_sections_are_frozen(cls):
    obj = cls()
    name = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, name, getattr(obj, name))


@pytest.mark.parametrize("key", SECTIONS)
def test_defaults_pass_config_validation_unchanged(key):
    cls = SECTIONS[key]
    cfg = config_from_dict({key: dataclasses.asdict(cls())}, source="t")
    assert getattr(cfg, key) == cls()
    assert getattr(config_from_dict({key: {}}, source="t"), key) == cls()  # empty section = defaults
    assert getattr(config_from_dict({key: None}, source="t"), key) == cls()


def test_optional_steps_are_off_by_default():
    assert FinetuneOptions().epochs == 0 and not FinetuneOptions().distill
    assert ScheduleOptions().final_amount is None
    assert SweepOptions().amounts == ()
    assert not TargetOptions().active and not TargetOptions().after_finetune
    assert not CalibrationOptions().allow_overlap  # train images that are also val images: refused by default


def test_documented_default_values():
    assert ExportOptions() == ExportOptions(half=False, dynamic=False, simplify=False, opset=None, atol=1e-3)
    assert CalibrationOptions() == CalibrationOptions(images=32, batch_size=8, seed=0, allow_overlap=False)
    assert FinetuneOptions().lr_scale == 0.1 and FinetuneOptions().distill_weight == 1.0
    assert (ScheduleOptions().start_epoch, ScheduleOptions().end_epoch, ScheduleOptions().every) == (0, 0, 1)
    t = TargetOptions()
    assert (t.runtime, t.size_of, t.threads, t.max_evals, t.tolerance, t.max_amount) == (
        "onnxruntime", "params", 1, 6, 0.02, 0.9)


def test_default_sweep_methods_and_target_choices_are_allowed_values():
    assert set(SweepOptions().methods) <= set(method_names())
    assert TargetOptions().runtime in TARGET_RUNTIMES and TargetOptions().size_of in TARGET_SIZES


@pytest.mark.parametrize("images, structure, want", [
    (None, "channel", 32), (None, "unstructured", 0), (0, "channel", 0), (5, "unstructured", 5), (64, "channel", 64),
])
def test_bn_recalibration_count(images, structure, want):
    assert BNRecalibrationOptions(images=images).count(structure) == want


@pytest.mark.parametrize("kw, active", [
    ({}, False), ({"max_drop": 0.01}, True), ({"min_speedup": 1.5}, True), ({"max_size": 0.6}, True),
    ({"max_drop": 0.0}, True),  # 0 is a limit, not "unset"
    ({"relative": True, "max_evals": 3, "runtime": "torch", "seed": 4}, False),  # knobs without a limit
])
def test_target_active_only_with_a_limit(kw, active):
    assert TargetOptions(**kw).active is active


@pytest.mark.parametrize("section, value, field_value", [
    ("export_options", {"opset": 12, "atol": 0.01, "half": True}, {"opset": 12, "atol": 0.01, "half": True}),
    ("calibration", {"images": 4, "seed": -3, "allow_overlap": True},
     {"images": 4, "seed": -3, "allow_overlap": True}),
    ("sweep", {"amounts": "0.1, 0.5", "methods": "global,lamp"},
     {"amounts": (0.1, 0.5), "methods": ("global", "lamp")}),
    ("finetune", {"epochs": 2, "lr_scale": 10, "distill_weight": 0},
     {"epochs": 2, "lr_scale": 10.0, "distill_weight": 0.0}),
    ("schedule", {"final_amount": 0.5, "start_epoch": 1, "end_epoch": 3}, {"final_amount": 0.5, "end_epoch": 3}),
    ("bn_recalibration", {"images": 0, "batch_size": 2}, {"images": 0, "batch_size": 2}),
    ("target", {"max_drop": 0.02, "runtime": "torch", "size_of": "onnx"},
     {"max_drop": 0.02, "runtime": "torch", "size_of": "onnx", "active": True}),
])
def test_section_values_accepted(section, value, field_value):
    got = getattr(config_from_dict({section: value}, source="t"), section)
    assert isinstance(got, SECTIONS[section])
    for k, want in field_value.items():
        assert getattr(got, k) == want and type(getattr(got, k)) is type(want), k


@pytest.mark.parametrize("section, value, match", [
    ("export_options", {"atol": 0}, "'export_options.atol' must be > 0, got 0"),
    ("export_options", {"opset": 6}, "'export_options.opset' must be an ONNX opset between 7 and 25, got 6"),
    ("export_options", {"half": "yes"}, "'export_options.half' must be true or false"),
    ("calibration", {"images": 0}, "'calibration.images' must be >= 1, got 0"),
    ("sweep", {"amounts": [0.5, 1.0]}, "'sweep.amounts' must satisfy 0 <= sweep.amounts < 1"),
    ("sweep", {"methods": ["global", "l2"]}, f"'sweep.methods' must be one of {', '.join(method_names())}; got 'l2'"),
    ("finetune", {"lr_scale": 0}, re.escape("'finetune.lr_scale' must be in (0, 10], got 0")),
    ("finetune", {"epochs": -1}, "'finetune.epochs' must be >= 0, got -1"),
    ("schedule", {"final_amount": 0.5, "every": 0}, "'schedule.every' must be >= 1, got 0"),
    ("schedule", {"final_amount": 0.5, "start_epoch": 3, "end_epoch": 1},
     re.escape("'schedule.end_epoch' (1) must be >= 'schedule.start_epoch' (3)")),
    ("bn_recalibration", {"batch_size": 0}, "'bn_recalibration.batch_size' must be >= 1, got 0"),
    ("target", {"max_drop": 0.01, "runtime": "tensorrt"},
     f"'target.runtime' must be one of {', '.join(TARGET_RUNTIMES)}; got 'tensorrt'"),
    ("target", {"max_drop": 0.01, "size_of": "flops"},
     f"'target.size_of' must be one of {', '.join(TARGET_SIZES)}; got 'flops'"),
    ("target", {"max_drop": 0.01, "max_evals": 1}, "'target.max_evals' must be >= 2, got 1"),
    ("target", {"min_speedup": 1.0}, re.escape("'target.min_speedup' must be in (1, 100) (dense/pruned latency")),
    ("calibration", {"imgs": 4}, re.escape("unknown key 'calibration.imgs'; did you mean 'calibration.images'?")),
    ("finetune", 3, "'finetune' must be a mapping of epochs, lr_scale, imgsz, warmup, distill, distill_weight"),
])
def test_section_values_rejected_naming_the_key(section, value, match):
    with pytest.raises(ConfigError, match=match) as e:
        config_from_dict({section: value}, source="cfg.yaml")
    assert str(e.value).startswith("cfg.yaml: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("section", SECTIONS)
def test_unknown_key_lists_the_section_fields(section):
    allowed = ", ".join(f"{section}.{f.name}" for f in dataclasses.fields(SECTIONS[section]))
    with pytest.raises(ConfigError, match=re.escape(f"(allowed: {allowed})")):
        config_from_dict({section: {"zz_not_a_key": 1}}, source="t")
