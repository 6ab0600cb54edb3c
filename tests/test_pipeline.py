"""pipeline.py, the one pipeline behind every entry point: ``pipeline.run`` itself (the file it writes, its
refusals, its one-line failures), and ``structure: channel`` through it: CLI prune, report, fine-tune keeping the
architecture, and a channel-pruned ``--weights`` file trained by ``yolo-prune train`` without re-initialisation
(synthetic data)."""

from __future__ import annotations

import json

import pytest
import torch

from yolo_prune_plugin import pipeline
from yolo_prune_plugin.prune import channel as channel_mod
from yolo_prune_plugin.cli import main
from yolo_prune_plugin.config import config_from_dict
from yolo_prune_plugin.errors import ConfigError, OutputExistsError, PruneError
from yolo_prune_plugin.prune.unstructured import conv_layers
from yolo_prune_plugin.report import validate_report
from yolo_prune_plugin.tools.synthetic import TINY, make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synthetic"), **TINY.dataset_kwargs())  # 3 classes


def _channels(model):
    return [(m.out_channels, m.in_channels) for _, m in conv_layers(model)]


def _conv_weights(model):
    return sum(m.weight.numel() for _, m in conv_layers(model))


@pytest.fixture(scope="module")
def pruned(backend, tiny_data, tmp_path_factory):
    """`yolo-prune prune --structure channel` on a 3-class YOLOv5n with the synthetic data: (source, pruned file,
    dense model, the channels each conv kept)."""
    from testkit import save_checkpoint

    torch.manual_seed(0)
    model = backend.yolo.Model(str(backend.root / "models" / "yolov5n.yaml"), ch=3, nc=3)
    model.names = {0: "circle", 1: "rectangle", 2: "triangle"}
    folder = tmp_path_factory.mktemp("channel")
    ckpt = save_checkpoint(model, folder / "best.pt")
    results = []

    def spy(*a, **k):  # the real channel pruning; its result says which channels each conv kept
        results.append(real(*a, **k))
        return results[-1]

    real = channel_mod.channel_prune
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(channel_mod, "channel_prune", spy)
        rc = main(["prune", "--weights", str(ckpt), "--data", str(tiny_data), "--img", "64", "--amount", "0.4",
                   "--structure", "channel", "--device", "cpu", "--workers", "0", "--batch-size", "4"])
    assert rc == 0 and len(results) == 1
    return ckpt, folder / "best_pruned.pt", model, results[0].kept


def test_cli_channel_prune_writes_a_smaller_model_and_report(backend, pruned):
    from testkit import assert_dense_slices

    src, out, dense, kept = pruned
    report = json.loads((src.parent / "prune_report.json").read_text())
    entry = validate_report(report)[0]
    assert entry.structure == "channel" and entry.channels["structure"] == "channel"
    small = torch.load(out)["model"].float()
    removed = 1 - _conv_weights(small) / _conv_weights(dense)
    # every kept channel of a conv that was not refit holds the dense file's weights (reconstruction refits only the
    # convs whose inputs lost channels; the stem and the others are slices of the dense model)
    assert assert_dense_slices(torch.load(out)["model"], torch.load(src)["model"], kept, refit=True) > 0
    assert abs(removed - 0.4) <= 0.02 and abs(entry.channels["achieved"] - removed) < 1e-6
    assert entry.channels["params_after"] < entry.channels["params_before"]
    assert entry.channels["gflops_after"] < entry.channels["gflops_before"]
    assert entry.channels["importance"] == "taylor"  # data given: the data-aware default
    # data given: sensitivity allocation and reconstruction by default (no compensation); BN statistics kept after it
    assert entry.channels["allocation"] == "sensitivity" and entry.channels["sensitivity_images"] == 8
    assert entry.channels["reconstruction"]["refit"] and not entry.channels["reconstruction"]["compensate"]
    assert entry.channels["reconstruction"]["images"] == 8 and entry.recalibration is None
    assert entry.metrics_after is not None and entry.metrics_before is not None
    assert entry.sparsity_after["conv_weights"] == _conv_weights(small)
    loaded = backend.attempt_load(out, "cpu")  # plain YOLOv5, no plugin hook needed for the smaller model
    assert loaded(torch.zeros(1, 3, 64, 64))[0].shape[-1] == 8


def test_train_with_channel_pruned_weights_trains_that_architecture(backend, pruned, tiny_data, tmp_path):
    _, out, _, _ = pruned
    want = _channels(torch.load(out)["model"])
    o = TINY.train_overrides(tiny_data, tmp_path / "runs", "exp", yolov5_root=backend.root)
    rc = main(["train", "--data", o["data"], "--weights", str(out), "--img", "64", "--epochs", "1",
               "--batch-size", "4", "--workers", "0", "--device", "cpu", "--noplots", "--project",
               str(tmp_path / "runs"), "--name", "exp"])
    assert rc == 0
    trained = torch.load(tmp_path / "runs" / "exp" / "weights" / "last.pt")["model"]
    assert _channels(trained) == want  # not YOLOv5's full-width re-initialisation
    assert backend.train.Model is backend.yolo.Model  # the patch is gone


@pytest.mark.parametrize("cfg,match", [
    ({"structure": "channel", "method": "obs"}, "choose 'channel.importance'"),
    ({"structure": "rows"}, "'structure' must be one of unstructured, channel"),
    ({"channel": {"round_to": 0}}, "'channel.round_to' must be >= 1"),
    ({"channel": {"cost_aware": -1}}, "'channel.cost_aware' must be in \\[0, 4\\]"),
    ({"channel": {"round_share": 0}}, "'channel.round_share' must be in \\(0, 1\\]"),
    ({"channel": {"round_share": 1.5}}, "'channel.round_share' must be in \\(0, 1\\]"),
])
def test_bad_channel_configs(cfg, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(cfg)


def test_channel_prune_without_data_needs_data_for_bn_recalibration(small_ckpt, capsys):
    rc = main(["prune", "--weights", str(small_ckpt), "--amount", "0.3", "--structure", "channel"])
    assert rc == 2 and "bn_recalibration" in capsys.readouterr().err
    assert not small_ckpt.with_name("best_pruned.pt").exists()


def test_cost_aware_option_reaches_channel_pruning(small_ckpt):
    from yolo_prune_plugin import api

    cfg = config_from_dict({"structure": "channel", "amount": 0.3, "evaluate": False,
                            "bn_recalibration": {"images": 0}, "channel": {"importance": "l1", "cost_aware": 0.1}})
    [entry] = api.prune(small_ckpt, config=cfg, imgsz=64)
    plain = api.prune(small_ckpt, config=cfg.with_overrides(channel={"importance": "l1"}, overwrite=True),
                      imgsz=64)[0]
    assert entry.channels["cost_aware"] == 0.1 and abs(entry.channels["achieved"] - 0.3) <= 0.02
    assert entry.channels["gflops_after"] < plain.channels["gflops_after"]  # the same amount, fewer FLOPs left


def _ctx(backend):
    from yolo_prune_plugin.stages import RunContext

    return RunContext(backend=backend, device=torch.device("cpu"), imgsz=64)


def test_run_writes_the_pruned_checkpoint_beside_the_source(backend, small_ckpt):
    """No data: nothing evaluated; ``best_pruned.pt`` holds the exact sparsity and the entry under ``prune``; the
    source is unchanged and no temporary file is left."""
    before = small_ckpt.read_bytes()
    entry = pipeline.run(small_ckpt, config_from_dict({"amount": 0.4, "method": "global"}), _ctx(backend))
    out = small_ckpt.with_name("best_pruned.pt")
    assert entry.output == str(out) and entry.metrics_before is None and entry.metrics_after is None
    saved = torch.load(out)
    assert saved["prune"]["sparsity_after"]["sparsity"] == pytest.approx(0.4, abs=1e-3) and saved["ema"] is None
    zeros = sum(int((m.weight == 0).sum()) for _, m in conv_layers(saved["model"]))
    assert zeros == saved["prune"]["sparsity_after"]["zeros"]
    assert small_ckpt.read_bytes() == before and sorted(f.name for f in small_ckpt.parent.iterdir()) == [
        "best.pt", "best_pruned.pt"]


def test_run_refuses_a_user_file_and_another_configuration(backend, small_ckpt):
    out = small_ckpt.with_name("best_pruned.pt")
    out.write_bytes(b"the user's own file")
    with pytest.raises(OutputExistsError, match="best_pruned.pt: exists and was not written by yolo_prune_plugin"):
        pipeline.run(small_ckpt, config_from_dict({"amount": 0.4}), _ctx(backend))
    assert out.read_bytes() == b"the user's own file"
    out.unlink()
    pipeline.run(small_ckpt, config_from_dict({"amount": 0.4, "method": "global"}), _ctx(backend))
    written = out.read_bytes()
    with pytest.raises(OutputExistsError, match=r"from a different pruning configuration \(method=global, amount=0.4\)"):
        pipeline.run(small_ckpt, config_from_dict({"amount": 0.5, "method": "global"}), _ctx(backend))
    assert out.read_bytes() == written


def test_an_unexpected_failure_is_one_line_naming_the_source(backend, small_ckpt, monkeypatch):
    import yolo_prune_plugin.stages as stages

    def boom(*a, **k):
        raise RuntimeError("injected\nsecond line")

    monkeypatch.setattr(stages, "prune_model", boom)
    with pytest.raises(PruneError, match=rf"^{small_ckpt}: pruning failed \(RuntimeError: injected\); run with --verbose"):
        pipeline.run(small_ckpt, config_from_dict({"amount": 0.4, "method": "global"}), _ctx(backend))
    assert not small_ckpt.with_name("best_pruned.pt").exists() and not list(small_ckpt.parent.glob(".*.tmp"))


@pytest.mark.parametrize("oneshot,after,warned", [(0.088, 0.076, True), (0.51, 0.59, False), (None, 0.5, False)])
def test_a_finetune_that_lowered_val_map_is_reported(caplog, oneshot, after, warned):
    """Measured on a coco128 split (64 train images, 80 classes): every fine-tune scored below the one-shot file."""
    import logging

    from yolo_prune_plugin.pipeline import _warn_if_finetune_lost
    from yolo_prune_plugin.report import ReportEntry

    caplog.set_level(logging.WARNING, logger="yolo_prune_plugin")
    e = ReportEntry("a.pt", "a_pruned.pt", "finetune", "global", 0.3, "cpu", 64,
                    metrics_oneshot=None if oneshot is None else {"mAP50-95": oneshot},
                    metrics_after={"mAP50-95": after})
    _warn_if_finetune_lost(e)
    assert ("fine-tuning lowered mAP50-95 on the val split (0.0880 one-shot -> 0.0760)" in caplog.text) is warned
