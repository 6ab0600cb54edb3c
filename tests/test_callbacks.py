"""callbacks.py: the train-end hook — rank logic, fallbacks, failures that never touch training outputs."""

from __future__ import annotations

import json
import importlib
import logging

import pytest
import torch

import yolo_prune_plugin.pipeline as pipeline_mod
from yolo_prune_plugin.callbacks import PrunePlugin, register
from yolo_prune_plugin.config import config_from_dict, load_config
from yolo_prune_plugin.report import ReportEntry, validate_report

from testkit import save_checkpoint


@pytest.fixture
def run_dir(small_model, tmp_path):
    """A finished YOLOv5 run folder: weights/best.pt and last.pt with the training options inside."""
    w = tmp_path / "exp" / "weights"
    w.mkdir(parents=True)
    opt = {"data": "unused.yaml", "imgsz": 64, "batch_size": 4, "device": "cpu", "single_cls": False, "workers": 0}
    save_checkpoint(small_model, w / "best.pt", opt=opt)
    save_checkpoint(small_model, w / "last.pt", opt=opt)
    return tmp_path / "exp"


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _no_eval(**kw):
    return config_from_dict({"amount": 0.4, "evaluate": False, **kw})


def test_register_adds_hook_to_yolov5_callbacks(backend):
    callbacks = backend.Callbacks()
    plugin = register(callbacks, amount=0.5, method="lamp")
    hooks = callbacks.get_registered_actions("on_train_end")
    assert [h["name"] for h in hooks] == ["yolo_prune_plugin"]
    assert hooks[0]["callback"].__self__ is plugin and plugin.config.amount == 0.5
    assert not backend.Callbacks().get_registered_actions("on_train_end")  # nothing leaks to a fresh instance


@pytest.mark.parametrize("rank,runs", [("-1", True), ("0", True), ("1", False), ("3", False)])
def test_only_rank_zero_prunes(run_dir, monkeypatch, rank, runs):
    monkeypatch.setenv("RANK", rank)
    w = run_dir / "weights"
    plugin = PrunePlugin(_no_eval())
    plugin.on_train_end(w / "last.pt", w / "best.pt", 0, None)
    assert plugin.ran is runs and plugin.error is None
    assert (w / "best_pruned.pt").exists() is runs
    assert (run_dir / "prune_report.json").exists() is runs


def test_hook_writes_pruned_file_and_report(backend, run_dir):
    w = run_dir / "weights"
    before = _snapshot(w)
    plugin = PrunePlugin(_no_eval(checkpoints=["best", "last"]))
    plugin.on_train_end(w / "last.pt", w / "best.pt", 0, None)
    assert plugin.error is None
    assert _snapshot(w).items() >= before.items()  # best.pt/last.pt byte-identical
    report = json.loads((run_dir / "prune_report.json").read_text())
    entries = validate_report(report)  # the one report-entry type, every key and type checked
    assert [e.mode for e in entries] == ["oneshot", "oneshot"]
    for e in entries:  # the same entry is stored in the pruned file
        assert ReportEntry.from_dict({k: v for k, v in torch.load(e.output)["prune"].items()
                                      if k not in ("version", "config", "date")}) == e
    assert [r["output"] for r in report["results"]] == [str(w / "best_pruned.pt"), str(w / "last_pruned.pt")]
    for f in ("best_pruned.pt", "last_pruned.pt"):
        ckpt = torch.load(w / f)  # weights_only: plain YOLOv5 classes only
        assert ckpt["ema"] is None and ckpt["model"].model[0].conv.weight.dtype == torch.float16
        assert ckpt["prune"]["version"] and ckpt["prune"]["config"]["amount"] == 0.4
        assert abs(ckpt["prune"]["sparsity_after"]["sparsity"] - 0.4) < 1e-3
        model = backend.attempt_load(w / f, "cpu")
        assert model(torch.zeros(1, 3, 64, 64))[0].shape[-1] == 8  # 3 classes + 5


def test_best_falls_back_to_last(run_dir, caplog):
    w = run_dir / "weights"
    (w / "best.pt").unlink()
    plugin = PrunePlugin(_no_eval())
    with caplog.at_level(logging.INFO, logger="yolo_prune_plugin"):
        plugin.on_train_end(w / "last.pt", w / "best.pt", 0, None)
    assert (w / "last_pruned.pt").exists() and plugin.error is None
    assert "best.pt not found, pruning last.pt instead" in caplog.text


@pytest.mark.parametrize("target", ["pipeline.run", "stages.prune_model", "pipeline.evaluate_weights"])
def test_failure_at_train_end_is_logged_and_leaves_outputs(run_dir, monkeypatch, caplog, target):
    w = run_dir / "weights"
    before = _snapshot(run_dir)
    mod, name = target.split(".")

    def boom(*a, **k):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(importlib.import_module(f"yolo_prune_plugin.{mod}"), name, boom)
    if name == "evaluate_weights":  # the unpruned model is validated in memory (no reload): fault that too
        monkeypatch.setattr(pipeline_mod, "evaluate", boom)
    cfg = config_from_dict({"amount": 0.4, "evaluate": name == "evaluate_weights"})
    plugin = PrunePlugin(cfg, opt={"data": "x.yaml", "imgsz": 64, "device": "cpu", "batch_size": 2})
    if name == "evaluate_weights":  # evaluation needs settings; give it real-looking ones without a dataset
        monkeypatch.setattr(pipeline_mod, "make_settings", lambda *a, **k: _FakeSettings())
    with caplog.at_level(logging.INFO, logger="yolo_prune_plugin"):
        plugin.on_train_end(w / "last.pt", w / "best.pt", 0, None)  # must not raise into YOLOv5
    assert isinstance(plugin.error.__cause__ or plugin.error, RuntimeError)  # inside pipeline.run: a PruneError
    retry = run_dir / "prune_retry.yaml"  # the one new file: the resolved config the retry command names
    assert {k: v for k, v in _snapshot(run_dir).items() if k != retry.relative_to(run_dir)} == before
    assert "injected fault" in caplog.text
    [(ns, retried)] = _retries(caplog.text)
    assert retried == cfg and ns.config == str(retry) and ns.weights == str(w / "best.pt")
    assert (ns.data, ns.imgsz, ns.device, ns.batch_size) == ("x.yaml", 64, "cpu", 4)


def _retries(log: str) -> list:
    """Each ``yolo-prune prune`` line logged after "Retry with:", parsed by the CLI's parser: (args, config)."""
    import shlex

    from yolo_prune_plugin.cli import _config_from_args, build_parser

    lines = log.split("Retry with:\n", 1)[1].splitlines()
    out = []
    for line in lines:
        if not line.strip().startswith("yolo-prune prune "):
            break
        argv = shlex.split(line.strip())
        ns, rest = build_parser().parse_known_args(argv[1:])
        assert not rest, rest
        out.append((ns, _config_from_args(ns, "")))
    return out


CHANNEL = {"amount": 0.4, "structure": "channel", "evaluate": False, "include": ["model.*"], "exclude": ["model.2*"],
           "channel": {"importance": "l1", "round_to": 4, "max_layer_ratio": 0.5, "cost_aware": 0.5},
           "bn_recalibration": {"images": 4, "batch_size": 2},
           "calibration": {"images": 8, "batch_size": 2, "seed": 3, "allow_overlap": True},
           "obs": {"damp": 0.05, "flip": False}, "export": ["onnx"], "export_options": {"opset": 12},
           "checkpoints": ["best", "last"]}


def test_retry_after_a_failed_channel_run_is_exact(run_dir, monkeypatch, caplog):
    """The retry command names a config file that gives back the run's config, every nested option included."""
    w = run_dir / "weights"

    def boom(*a, **k):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(pipeline_mod, "prune_stage", boom)
    monkeypatch.setattr(pipeline_mod, "make_settings", lambda *a, **k: _FakeSettings())  # BN recalibration: data
    cfg = config_from_dict(CHANNEL)
    plugin = PrunePlugin(cfg, opt={"data": "x.yaml", "imgsz": 64, "device": "cpu", "batch_size": 8, "workers": 0})
    with caplog.at_level(logging.INFO, logger="yolo_prune_plugin"):
        plugin.on_train_end(w / "last.pt", w / "best.pt", 0, None)
    assert isinstance(plugin.error.__cause__ or plugin.error, RuntimeError)
    retries = _retries(caplog.text)
    assert [ns.weights for ns, _ in retries] == [str(w / "best.pt"), str(w / "last.pt")]  # checkpoints: best, last
    for ns, retried in retries:
        assert retried == cfg and retried.structure == "channel"
        assert (ns.data, ns.imgsz, ns.device, ns.batch_size, ns.workers) == ("x.yaml", 64, "cpu", 16, 0)
    # a user's file of the retry name is never replaced; a second failure reuses the file of the same config
    (run_dir / "prune_retry.yaml").write_text("my: own file\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="yolo_prune_plugin"):
        plugin.on_train_end(w / "last.pt", w / "best.pt", 0, None)
    [ns, _] = [ns for ns, _ in _retries(caplog.text)]
    assert ns.config == str(run_dir / "prune_retry_2.yaml") and load_config(ns.config) == cfg
    assert (run_dir / "prune_retry.yaml").read_text() == "my: own file\n"


@pytest.mark.parametrize("extra,note", [({"finetune": {"epochs": 3, "lr_scale": 0.5}}, "--prune-finetune-epochs 3"),
                                        ({"schedule": {"end_epoch": 2, "final_amount": 0.6}}, "gradual pruning")])
def test_retry_of_a_recovery_mode_prunes_one_shot_and_says_how_to_redo_it(run_dir, extra, note):
    """`yolo-prune prune` prunes one-shot: the retry's config leaves the fine-tune/schedule out (prune would refuse
    it), everything else as the run had it, and the line says how to redo the rest."""
    w = run_dir / "weights"
    cfg = config_from_dict({**CHANNEL, **extra})
    plugin = PrunePlugin(cfg, opt={"data": "x.yaml", "imgsz": 64, "device": "cpu", "batch_size": 8})
    text = plugin.retry_command(w / "best.pt")
    ns, retried = _retries("Retry with:\n" + text)[0]
    assert retried.finetune.epochs == 0 and retried.schedule.final_amount is None
    want = cfg.to_dict()
    want.update(finetune={**want["finetune"], "epochs": 0}, schedule=retried.to_dict()["schedule"],
                amount=cfg.schedule.final_amount or cfg.amount)
    assert retried.to_dict() == want
    assert note in text.splitlines()[-1]
    if "finetune" in extra:  # train again with that very file and the fine-tune's epochs
        assert f"--prune-config {ns.config} --prune-finetune-epochs 3" in text.splitlines()[-1]


class _FakeSettings:
    device = torch.device("cpu")
    imgsz, batch_size, iou_thres, half, data = 64, 2, 0.6, False, {}


def test_existing_output_from_other_config_is_not_clobbered(run_dir, caplog):
    w = run_dir / "weights"
    PrunePlugin(_no_eval()).on_train_end(w / "last.pt", w / "best.pt", 0, None)
    first = (w / "best_pruned.pt").read_bytes()
    plugin = PrunePlugin(config_from_dict({"amount": 0.6, "evaluate": False}))
    plugin.on_train_end(w / "last.pt", w / "best.pt", 0, None)
    assert "exists from a different pruning configuration" in str(plugin.error)
    assert (w / "best_pruned.pt").read_bytes() == first
    # same config again: fine; overwrite flag: replaced
    again = PrunePlugin(_no_eval())
    again.on_train_end(w / "last.pt", w / "best.pt", 0, None)
    assert again.error is None
    forced = PrunePlugin(config_from_dict({"amount": 0.6, "evaluate": False, "overwrite": True}))
    forced.on_train_end(w / "last.pt", w / "best.pt", 0, None)
    assert forced.error is None
    assert torch.load(w / "best_pruned.pt")["prune"]["config"]["amount"] == 0.6


def test_user_file_of_same_name_is_not_clobbered(run_dir):
    w = run_dir / "weights"
    (w / "best_pruned.pt").write_bytes(b"my own file")
    plugin = PrunePlugin(_no_eval())
    plugin.on_train_end(w / "last.pt", w / "best.pt", 0, None)
    assert "not written by yolo_prune_plugin" in str(plugin.error)
    assert (w / "best_pruned.pt").read_bytes() == b"my own file"


def test_sweep_at_train_end(backend, small_model, tmp_path):
    from yolo_prune_plugin.tools.synthetic import TINY, make_dataset

    data = make_dataset(tmp_path / "data", **TINY.dataset_kwargs())  # 3 classes, like small_model
    w = tmp_path / "exp" / "weights"
    w.mkdir(parents=True)
    opt = {"data": str(data), "imgsz": 64, "batch_size": 4, "device": "cpu", "workers": 0}
    save_checkpoint(small_model, w / "best.pt", opt=opt)
    cfg = config_from_dict({"amount": 0.3, "evaluate": False, "sweep": {"amounts": [0.2], "methods": ["global"]}})
    plugin = PrunePlugin(cfg)
    plugin.on_train_end(w / "last.pt", w / "best.pt", 0, None)
    assert plugin.error is None
    report = json.loads((tmp_path / "exp" / "prune_report.json").read_text())
    assert [(p["method"], p["amount"]) for p in report["sweep"]["points"]] == [("global", 0.2)]
    assert (tmp_path / "exp" / "sweep" / "sweep.png").is_file()


@pytest.mark.parametrize("bad,match", [({"mode": "sometimes"}, "'mode' must be one of"),
                                       ({"extra_key": 1}, "unknown key"), ({"amount": "0.3"}, "'amount' must be")])
def test_report_schema_rejects_bad_entries(run_dir, bad, match):
    w = run_dir / "weights"
    PrunePlugin(_no_eval()).on_train_end(w / "last.pt", w / "best.pt", 0, None)
    report = json.loads((run_dir / "prune_report.json").read_text())
    report["results"][0].update(bad)
    with pytest.raises(ValueError, match=match):
        validate_report(report)
    del report["results"][0]["checkpoint"]
    with pytest.raises(ValueError, match="missing key"):
        ReportEntry.from_dict({k: v for k, v in report["results"][0].items() if k not in bad})


def test_train_end_loads_each_checkpoint_once(run_dir, monkeypatch):
    """best.pt is read once for options, pruning and the sweep's dense model (YOLOv5 may load the pruned file)."""
    w = run_dir / "weights"
    reads = []
    real = torch.load

    def counting(f, *a, **k):
        reads.append(str(f))
        return real(f, *a, **k)

    monkeypatch.setattr(torch, "load", counting)
    plugin = PrunePlugin(_no_eval())
    plugin.on_train_end(w / "last.pt", w / "best.pt", 0, None)
    assert plugin.error is None
    assert reads.count(str(w / "best.pt")) == 1


def test_hook_leaves_patched_names_as_they_were(backend, run_dir):
    """After the hook: numpy, Pillow, YOLOv5's train.*/check_font and sys.path are as before (backend.patches.PROCESS_WIDE
    lists what stays)."""
    import sys

    import numpy as np
    from PIL import ImageFont

    def state():
        return (getattr(np, "trapz", None), ImageFont.FreeTypeFont.__dict__.get("getsize"),
                backend.general.check_font, dict(vars(backend.train)), list(sys.path))

    callbacks = backend.Callbacks()
    before = state()
    register(callbacks, _no_eval())
    callbacks.run("on_pretrain_routine_start")
    w = run_dir / "weights"
    callbacks.run("on_train_end", w / "last.pt", w / "best.pt", 0, None)
    assert (w / "best_pruned.pt").is_file()
    assert state() == before
