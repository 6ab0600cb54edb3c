"""config.py: defaults, YAML loading, validation errors that name the key and what is allowed."""

from __future__ import annotations

import pytest

from yolo_prune_plugin.config import DEFAULT_CONFIG_PATH, PruneConfig, config_from_dict, load_config
from yolo_prune_plugin.errors import ConfigError


def test_documented_default_file_equals_builtin_defaults():
    assert DEFAULT_CONFIG_PATH.is_file()
    assert load_config(DEFAULT_CONFIG_PATH) == PruneConfig() == load_config()


def test_config_is_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError, match="amount"):
        PruneConfig().amount = 0.5  # type: ignore[misc]


def test_flags_override_yaml(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("amount: 0.2\nmethod: lamp\nexclude: ['model.24.*']\n")
    cfg = load_config(f, amount=0.6, method=None)
    assert (cfg.amount, cfg.method, cfg.exclude) == (0.6, "lamp", ("model.24.*",))


def test_nested_prune_key_and_lists_from_strings(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("prune:\n  amount: 0.4\n  export: onnx, TorchScript\n  checkpoints: [best, last]\n")
    cfg = load_config(f)
    assert cfg.export == ("onnx", "torchscript") and cfg.checkpoints == ("best", "last") and cfg.amount == 0.4


@pytest.mark.parametrize("data,match", [
    ({"ammount": 0.3}, r"unknown key 'ammount'; did you mean 'amount'\?"),
    ({"amount": 1.5}, r"'amount' must satisfy 0 <= amount < 1.*got 1.5"),
    ({"amount": -0.1}, r"'amount' must satisfy 0 <= amount < 1"),
    ({"amount": "0.3"}, r"'amount' must be a number, got '0.3' \(str\)"),
    ({"amount": True}, r"'amount' must be a number"),
    ({"method": "magnitude"}, r"'method' must be one of auto, global, layerwise, lamp, obs; got 'magnitude'"),
    ({"include": 3}, r"'include' must be a list of non-empty strings"),
    ({"checkpoints": ["best", "final"]}, r"'checkpoints' must be one of best, last; got 'final'"),
    ({"evaluate": "yes"}, r"'evaluate' must be true or false"),
    ({"suffix": "../x"}, r"'suffix' must be a non-empty file-name fragment"),
    ({"export_options": {"opsett": 12}}, r"unknown key 'export_options.opsett'; did you mean 'export_options.opset'"),
    ({"calibration": {"images": 0}}, r"'calibration.images' must be >= 1"),
    ({"obs": {"steps": 0}}, r"'obs.steps' must be >= 1, got 0"),
    ({"obs": {"steps": 1.5}}, r"'obs.steps'"),
    ({"sweep": {"amounts": [0.1, 1.2]}}, r"'sweep.amounts' must satisfy"),
    ({"sweep": {"methods": ["global", "l2"]}}, r"'sweep.methods' must be one of"),
    ({"finetune": {"epochs": -1}}, r"'finetune.epochs' must be >= 0"),
    ({"schedule": {"final_amount": 0.5, "start_epoch": 3, "end_epoch": 1}}, r"'schedule.end_epoch' \(1\) must be >="),
    ({"schedule": {"final_amount": 0.5, "end_epoch": 2}, "finetune": {"epochs": 2}}, r"set only one"),
    ({"finetune": 3}, r"'finetune' must be a mapping"),
    # a schedule section without its final sparsity is an error, never silently off (amount is not inherited)
    ({"amount": 0.5, "schedule": {"start_epoch": 1, "end_epoch": 3}},
     r"'schedule.final_amount' is missing: 'schedule' sets start_epoch, end_epoch"),
    ({"schedule": {"every": 2}}, r"'schedule.final_amount' is missing: 'schedule' sets every"),
    ({"schedule": {"final_amount": None, "end_epoch": 3}}, r"'schedule.final_amount' is null .*sets end_epoch"),
])
def test_invalid_values_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data, source="my.yaml")


@pytest.mark.parametrize("text,match", [
    ("amount: [", "not valid YAML"),
    ("- 0.3\n", "expected a mapping of prune options"),
    ("amonut: 0.3\n", "unknown key 'amonut'; did you mean 'amount'"),
])
def test_bad_files_name_the_file(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(f)
    assert str(f) in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_to_dict_round_trips():
    cfg = config_from_dict({"amount": 0.5, "method": "lamp", "export": ["onnx"], "sweep": {"amounts": [0.1, 0.2]}})
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("schedule", [None, {}, {"final_amount": None},
                                      {"start_epoch": 0, "end_epoch": 0, "final_amount": None, "every": 1}])
def test_schedule_off_forms(schedule):
    """Off: no section, an empty one, or final_amount null with the defaults (the documented file's form)."""
    cfg = config_from_dict({"schedule": schedule})
    assert cfg.schedule.final_amount is None and config_from_dict(cfg.to_dict()) == cfg


def test_schedule_without_final_amount_fails_from_yaml_and_with_flags(tmp_path):
    f = tmp_path / "sched.yaml"
    f.write_text("amount: 0.5\nschedule:\n  start_epoch: 2\n  end_epoch: 8\n")
    for overrides in ({}, {"amount": 0.4}):  # --prune-amount does not make it a schedule target either
        with pytest.raises(ConfigError, match=rf"{f}: 'schedule.final_amount' is missing"):
            load_config(f, **overrides)
    cfg = config_from_dict({"amount": 0.5, "schedule": {"start_epoch": 2, "end_epoch": 8, "final_amount": 0.6}})
    assert cfg.with_overrides(amount=0.4).schedule.final_amount == 0.6  # round trip of an enabled schedule
    with pytest.raises(ConfigError, match=r"flags: 'schedule.final_amount' is missing"):
        cfg.with_overrides(schedule={"end_epoch": 4})
