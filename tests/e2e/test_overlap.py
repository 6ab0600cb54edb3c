"""A data YAML whose train and val are the same images (coco128 as shipped, many users' YAMLs) through
``yolo-prune train --prune-*``: each data-aware step does what docs/overlap.md says, decided and said before the
first epoch, and stored in the report."""

from __future__ import annotations

import json

import pytest

from yolo_prune_plugin.cli import main

from testkit import fake_train_main, same_split

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def same_yaml(tiny_data, tmp_path_factory):
    """The tiny synthetic data set with ``train:`` = ``val:`` (every calibration image is an evaluation image)."""
    return same_split(tiny_data, tmp_path_factory.mktemp("overlap"))


class TrainSpy(list):
    """The plugin's log as it was each time YOLOv5's ``train.main`` started; ``main`` is what then runs (YOLOv5's
    real one unless a test puts a prepared run folder in its place)."""

    main = None


@pytest.fixture
def train_spy(backend, monkeypatch, caplog):
    """YOLOv5's real ``train.main``, recording the plugin's log as it was when training started."""
    seen = TrainSpy()
    seen.main = backend.train.main

    def spy(*args, **kwargs):
        seen.append(caplog.text)
        return seen.main(*args, **kwargs)

    monkeypatch.setattr(backend.train, "main", spy)
    return seen


def _train(data, cfg, project, *prune_flags):
    return main(["train", "--data", str(data), "--cfg", str(cfg), "--weights", "", "--img", "64", "--epochs", "1",
                 "--batch-size", "4", "--workers", "0", "--device", "cpu", "--noplots", "--noautoanchor",
                 "--project", str(project), "--name", "exp", *prune_flags])


def _entry(project):
    return json.loads((project / "exp" / "prune_report.json").read_text())["results"][0]


@pytest.mark.parametrize("flags, config, steps, real", [
    # channel defaults: Taylor ranking falls back to L1, global allocation, no reconstruction, BatchNorm statistics
    # recalibrated anyway (a real training: the default path end to end)
    (["--prune-structure", "channel"], None, {"channel.importance": "l1 instead of taylor",
                                              "channel.allocation": "global instead of sensitivity",
                                              "channel.reconstruct": "off (BatchNorm recalibration instead)",
                                              "bn_recalibration": "on the train images anyway"}, True),
    # unstructured with BatchNorm recalibration asked for: recalibrated anyway (a prepared run folder: the decision
    # and the train-end hook are what is tested, not the epochs)
    (["--prune-method", "global"], "bn_recalibration: {images: 4}", {"bn_recalibration": "on the train images anyway"},
     False),
    # the user accepted the overlap: Taylor ranking and reconstruction on it, nothing falls back
    (["--prune-structure", "channel"], "calibration: {allow_overlap: true}", {}, False),
])
def test_overlapping_splits_prune_at_train_end(same_yaml, tiny_cfg, tiny_model, tmp_path, caplog, train_spy, flags,
                                                config, steps, real):
    if not real:
        train_spy.main = fake_train_main(tiny_model)
    extra = ["--prune-amount", "0.3", *flags]
    if config:
        (tmp_path / "prune.yaml").write_text(config + "\n")
        extra += ["--prune-config", str(tmp_path / "prune.yaml")]
    with caplog.at_level("INFO", logger="yolo_prune_plugin"):
        rc = _train(same_yaml, tiny_cfg, tmp_path / "runs", *extra)
    assert rc == 0 and len(train_spy) == 1
    entry = _entry(tmp_path / "runs")
    assert entry["metrics_after"] is not None
    reconstructed = "reconstruction" in (entry.get("channels") or {})  # the refit replaces BatchNorm recalibration
    assert reconstructed == ("--prune-structure" in flags and not steps)
    assert (entry["recalibration"] is None) == reconstructed
    overlap = entry["method_details"].get("overlap", {})
    assert sorted(overlap) == (sorted([*steps, "overlap"]) if steps else [])
    for step, what in steps.items():
        assert overlap[step].startswith(what)
        assert f"{step}: {what}" in train_spy[0]  # said before the first epoch
    if steps:
        assert "share 2 image file(s)" in overlap["overlap"] and str(same_yaml) in overlap["overlap"]
    if "--prune-structure" in flags:
        assert entry["channels"]["importance"] == ("l1" if steps else "taylor")
        assert entry["channels"]["allocation"] == ("global" if steps else "sensitivity")


@pytest.mark.parametrize("flags, config, key", [
    (["--prune-method", "obs"], None, "method: obs"),
    (["--prune-structure", "channel"], "channel: {importance: taylor}", "channel.importance: taylor"),
    (["--prune-method", "global"], "sweep: {amounts: [0.2], methods: [global, obs]}", "sweep.methods: obs"),
    (["--prune-structure", "channel"], "channel: {importance: l1, reconstruct: true}", "channel.reconstruct: true"),
    (["--prune-structure", "channel"], "channel: {importance: l1, allocation: sensitivity}",
     "channel.allocation: sensitivity"),
])
def test_explicit_data_aware_choice_is_refused_before_training(same_yaml, tiny_cfg, tmp_path, capsys, train_spy,
                                                               flags, config, key):
    extra = list(flags)
    if config:
        (tmp_path / "prune.yaml").write_text(config + "\n")
        extra += ["--prune-config", str(tmp_path / "prune.yaml")]
    rc = _train(same_yaml, tiny_cfg, tmp_path / "runs", *extra)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("yolo-prune:")]
    assert rc == 2 and train_spy == []  # no epoch ran
    assert len(err) == 1 and err[0].startswith(f"yolo-prune: error: {key} fits the pruned model")
    assert "calibration.allow_overlap: true" in err[0] and "disjoint train and val splits" in err[0]


def test_three_line_path_refuses_an_explicit_choice_before_the_first_epoch(backend, same_yaml, tiny_cfg, tmp_path):
    """``register(callbacks)`` + ``train.main`` (no api.preflight): the overlap is decided at
    ``on_pretrain_routine_start``, so an explicit ``method: obs`` stops YOLOv5 before any epoch."""
    from yolo_prune_plugin import register
    from yolo_prune_plugin.api import train_opt
    from yolo_prune_plugin.config import config_from_dict
    from yolo_prune_plugin.errors import ConfigError

    opt = train_opt(backend=backend, data=str(same_yaml), cfg=str(tiny_cfg), weights="", imgsz=64, epochs=1,
                    batch_size=4, workers=0, device="cpu", noplots=True, noautoanchor=True,
                    project=str(tmp_path / "runs"), name="exp")
    callbacks = backend.Callbacks()
    register(callbacks, config_from_dict({"method": "obs", "amount": 0.3}))
    with pytest.raises(ConfigError, match="method: obs fits the pruned model to its calibration images"):
        backend.train.main(opt, callbacks=callbacks)
    assert not list((tmp_path / "runs").rglob("*.pt"))  # no epoch ran, nothing saved
