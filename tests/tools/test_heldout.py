"""Held-out evaluation (issue 11): calibration never reads evaluation images, YOLOv5's NMS time limit cannot
change the plugin's metrics, held-out split YAMLs, and the custom corn-pest model end to end."""

from __future__ import annotations

import copy
import time

import pytest
import yaml

from yolo_prune_plugin.prune.calibration import load_calibration_batch
from yolo_prune_plugin.backend.patches import driving_yolov5
from yolo_prune_plugin.prune.calibration import check_disjoint, load_calibration_images
from yolo_prune_plugin.errors import ConfigError
from yolo_prune_plugin.backend.data import image_files
from yolo_prune_plugin.tools.heldout import retarget_data_yaml, split_data_yaml

from testkit import data_yaml, same_split


# ---------------------------------------------------------------------------------------------------
# calibration and evaluation images are disjoint
# ---------------------------------------------------------------------------------------------------
def _lists(tmp_path, shared, cal: slice, ev: slice):
    files = sorted((shared / "data" / "coco8" / "images").rglob("*.jpg"))
    assert len(files) == 8
    (tmp_path / "cal.txt").write_text("".join(f"{f}\n" for f in files[cal]))
    (tmp_path / "ev.txt").write_text("".join(f"{f}\n" for f in files[ev]))
    data = tmp_path / "lists.yaml"
    data.write_text(yaml.safe_dump({"path": str(tmp_path), "train": str(tmp_path / "cal.txt"),
                                    "val": str(tmp_path / "ev.txt"), "names": {i: str(i) for i in range(80)}}))
    return data


@pytest.mark.parametrize("cal, ev, shared_n", [(slice(0, 5), slice(4, 8), 1), (slice(0, 8), slice(0, 8), 8)])
def test_overlapping_splits_fail_loudly(tmp_path, shared, backend, cal, ev, shared_n):
    data = _lists(tmp_path, shared, cal, ev)
    with pytest.raises(ConfigError, match=rf"lists\.yaml: calibration split 'train' and evaluation split 'val' "
                                          rf"share {shared_n} image file"):
        load_calibration_images(data, 64, n=2)
    with pytest.raises(ConfigError, match="share"), driving_yolov5(backend):  # the check_dataset dict too
        check_disjoint(backend.general.check_dataset(str(data)))
    with pytest.raises(ConfigError, match="share"):  # the labelled batch of channel pruning's Taylor importance too
        load_calibration_batch(data, 64, n=2)
    # knowingly accepted: loads
    assert load_calibration_images(data, 64, n=2, allow_overlap=True).shape == (2, 3, 64, 64)


def test_disjoint_lists_load(tmp_path, shared):
    data = _lists(tmp_path, shared, slice(0, 4), slice(4, 8))
    x = load_calibration_images(data, 64, n=8)
    assert x.shape == (4, 3, 64, 64)  # only the 4 calibration images exist to draw from


def test_coco128_as_shipped_is_refused(tmp_path, shared):
    with pytest.raises(ConfigError, match=r"coco128\.yaml.*share 128 image"):
        load_calibration_images(data_yaml(shared, "coco128", tmp_path), 64, n=2)


@pytest.mark.parametrize("cal, ev", [(64, 64), (16, 100)])
def test_split_data_yaml_is_deterministic_and_disjoint(tmp_path, shared, cal, ev):
    out = split_data_yaml(shared / "data" / "coco128.yaml", tmp_path / "a", calibration=cal, evaluation=ev)
    again = split_data_yaml(shared / "data" / "coco128.yaml", tmp_path / "b", calibration=cal, evaluation=ev)
    d = yaml.safe_load(out.read_text())
    c, e = image_files(d["train"]), image_files(d["val"])
    assert len(c) == cal and len(e) == ev and not set(c) & set(e)
    everything = image_files(shared / "data" / "coco128" / "images" / "train2017")
    assert c == everything[:cal] and e == everything[-ev:]  # sorted names: first / last
    assert image_files(yaml.safe_load(again.read_text())["val"]) == e
    check_disjoint(out)  # no error
    assert d["names"][0] == "person"


def test_split_too_many(tmp_path, shared):
    with pytest.raises(ConfigError, match="cannot split 128 'val' images into 100 calibration"):
        split_data_yaml(shared / "data" / "coco128.yaml", tmp_path, calibration=100, evaluation=64)


# ---------------------------------------------------------------------------------------------------
# NMS time limit
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def slow_nms(monkeypatch):
    """torchvision's NMS sleeping past YOLOv5's time limit (0.5 + 0.05 * batch s) on every image."""
    import torchvision

    real = torchvision.ops.nms

    def nms(*args, **kwargs):
        time.sleep(0.75)
        return real(*args, **kwargs)

    monkeypatch.setattr(torchvision.ops, "nms", nms)


@pytest.fixture(scope="module")
def coco8_eval(backend, shared, tmp_path_factory):
    from yolo_prune_plugin.backend.loading import load_checkpoint
    from yolo_prune_plugin.backend.evaluation import make_settings
    from yolo_prune_plugin.tools.sweep import _batches

    settings = make_settings(data_yaml(shared, "coco8", tmp_path_factory.mktemp("d8")), 160, 4, "cpu",
                             workers=0, backend=backend)
    model = load_checkpoint(shared / "weights" / "yolov5n.pt")["model"].float().fuse().eval()
    return model, settings, _batches(settings, 32, backend)


def _yolov5_val(backend, model, settings, batches, tmp_path):
    r = backend.val.run(settings.data, batch_size=settings.batch_size, imgsz=settings.imgsz, model=model,
                        iou_thres=settings.iou_thres, dataloader=batches, save_dir=tmp_path, plots=False,
                        half=False, verbose=False)[0]
    return [float(v) for v in r[:4]]


def test_nms_time_limit_cannot_change_metrics(backend, coco8_eval, tmp_path, caplog, monkeypatch, one_thread):
    import torchvision

    from yolo_prune_plugin.backend.evaluation import no_nms_time_limit
    from yolo_prune_plugin.backend.evaluation import evaluate

    model, settings, batches = coco8_eval
    normal = evaluate(copy.deepcopy(model), settings, batches, backend)
    assert normal.map > 0 and normal.nms_time_limit == "lifted" and normal.to_dict()["nms_time_limit"] == "lifted"
    orig = backend.val.non_max_suppression
    real = torchvision.ops.nms

    def nms(*args, **kwargs):
        time.sleep(0.75)  # > 0.5 + 0.05 * 4: YOLOv5 stops after the first image of the batch
        return real(*args, **kwargs)

    monkeypatch.setattr(torchvision.ops, "nms", nms)
    # YOLOv5's own validator drops detections: the simulated slowness does matter ...
    plain = _yolov5_val(backend, copy.deepcopy(model), settings, batches, tmp_path)
    assert plain[3] < normal.map - 0.05
    # ... but not for the plugin's evaluation, and not inside the context manager
    slow = evaluate(copy.deepcopy(model), settings, batches, backend)
    assert slow.to_dict() == normal.to_dict() and slow.nms_timeouts == 0
    with no_nms_time_limit(backend):
        assert backend.val.non_max_suppression is not orig
        lifted = _yolov5_val(backend, copy.deepcopy(model), settings, batches, tmp_path)
    assert lifted == pytest.approx([normal.precision, normal.recall, normal.map50, normal.map], abs=1e-9)
    assert backend.val.non_max_suppression is orig  # restored
    assert backend.val.non_max_suppression.__globals__["time"] is time


def test_no_nms_time_limit_restores_on_error(backend):
    from yolo_prune_plugin.backend.evaluation import no_nms_time_limit

    orig = backend.val.non_max_suppression
    with pytest.raises(RuntimeError, match="boom"):
        with no_nms_time_limit(backend):
            with no_nms_time_limit(backend):  # nested: inner leaves the outer wrapping alone
                assert getattr(backend.val.non_max_suppression, "_yolo_prune_no_limit", False)
            assert backend.val.non_max_suppression is not orig
            raise RuntimeError("boom")
    assert backend.val.non_max_suppression is orig


# ---------------------------------------------------------------------------------------------------
# the custom corn-pest model, end to end
# ---------------------------------------------------------------------------------------------------
def test_cornpest_prunes_and_evaluates_end_to_end(shared, tmp_path, backend, one_thread):
    from yolo_prune_plugin import api
    from yolo_prune_plugin.backend.loading import load_checkpoint

    weights = shared / "weights" / "yolov5n-cornpest.pt"
    if not weights.is_file():
        pytest.skip(f"needs {weights}")
    data = retarget_data_yaml(shared / "data" / "cornpest.yaml", tmp_path / "data")  # calibrate train, eval test
    d = yaml.safe_load(data.read_text())
    assert d["val"].endswith("cornpest/test/images") and d["train"].endswith("cornpest/train/images")
    check_disjoint(data)
    subset = tmp_path / "test32.txt"  # 32 of the 117 never-seen test images keep the test short
    subset.write_text("".join(f"{f}\n" for f in image_files(d["val"])[:32]))
    data = tmp_path / "data" / "cornpest-test32.yaml"
    data.write_text(yaml.safe_dump({**d, "val": str(subset)}))
    src = load_checkpoint(weights)
    names = dict((src.get("ema") or src["model"]).names)
    assert len(names) == 4
    local = tmp_path / "best.pt"
    local.write_bytes(weights.read_bytes())  # the pruned file is written beside the weights
    [entry] = api.prune(local, data, imgsz=416, batch_size=32, device="cpu", workers=0, method="obs", amount=0.5,
                        calibration={"images": 4, "batch_size": 4, "seed": 0})
    out = load_checkpoint(entry.output)
    model = out.get("ema") or out["model"]
    assert dict(model.names) == names and int(model.nc) == 4 and int(model.model[-1].nc) == 4
    assert out["prune"]["method"] == "obs" and out["prune"]["method_details"]["calibration_images"] == 4
    assert abs(entry.sparsity_after["sparsity"] - 0.5) < 1e-4
    before, after = entry.metrics_before, entry.metrics_after
    assert before["nms_time_limit"] == after["nms_time_limit"] == "lifted"
    assert before["mAP50-95"] > 0.3  # a trained 4-class model on its never-seen test split
    assert 0.8 * before["mAP50-95"] < after["mAP50-95"] <= 1.05 * before["mAP50-95"]


@pytest.mark.parametrize("value, ok", [(True, True), (False, True), ("yes", False), (1, False)])
def test_allow_overlap_config_key(value, ok):
    from yolo_prune_plugin.config import config_from_dict

    if ok:
        assert config_from_dict({"calibration": {"allow_overlap": value}}).calibration.allow_overlap is value
    else:
        with pytest.raises(ConfigError, match=r"'calibration\.allow_overlap' must be true or false"):
            config_from_dict({"calibration": {"allow_overlap": value}})


# ---------------------------------------------------------------------------------------------------
# method: auto (the default): obs on held-out calibration images, else global
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def auto_data(tmp_path_factory):
    from yolo_prune_plugin.tools.synthetic import TINY, make_dataset

    return make_dataset(tmp_path_factory.mktemp("auto") / "data", **TINY.dataset_kwargs())  # train/val disjoint


@pytest.mark.parametrize("method, overlap, allow, expected, why", [
    ("auto", False, False, "obs", r"auto -> obs: 32 train-split images, none of them in val"),
    ("auto", True, False, "global", r"auto -> global: no held-out calibration images \(.*same\.yaml: calibration "
                                    r"split 'train' and evaluation split 'val' share \d+ image"),
    ("auto", True, True, "obs", r"auto -> obs"),
    ("global", False, False, "global", r"^$"),
    ("obs", True, False, "obs", r"^$"),  # an explicit choice is not second-guessed (its loader refuses the overlap)
])
def test_auto_resolves_by_calibration_data(auto_data, tmp_path, method, overlap, allow, expected, why):
    from yolo_prune_plugin.prune.calibration import resolve_method

    data = same_split(auto_data, tmp_path) if overlap else auto_data
    got, reason = resolve_method(method, str(data), 32, allow)
    assert got == expected
    assert re_search(why, reason)


def test_auto_without_data_is_global():
    from yolo_prune_plugin.prune.calibration import resolve_method

    assert resolve_method("auto", None)[0] == "global"
    assert "pass --data" in resolve_method("auto", None)[1]


@pytest.mark.parametrize("overlap, expected", [(False, "obs"), (True, "global")])
def test_default_config_prunes_with_auto(small_ckpt, auto_data, tmp_path, caplog, overlap, expected, one_thread):
    """The default config, end to end: obs on the synthetic data's disjoint train split, global (with the
    reason logged and reported) when train and val are the same images; exact sparsity either way."""
    from yolo_prune_plugin.api import prune
    from yolo_prune_plugin.config import PruneConfig
    from yolo_prune_plugin.report import validate_report

    assert PruneConfig().method == "auto"
    data = same_split(auto_data, tmp_path) if overlap else auto_data
    with caplog.at_level("INFO", logger="yolo_prune_plugin"):
        (entry,) = prune(small_ckpt, data=data, imgsz=64, batch_size=4, device="cpu", workers=0, amount=0.5,
                         report_dir=tmp_path / "rep")
    assert entry.method == expected
    assert entry.method_details["auto"].startswith(f"auto -> {expected}")
    assert f"method auto -> {expected}" in caplog.text
    assert abs(entry.sparsity_after["sparsity"] - 0.5) < 1e-3
    if expected == "obs":
        assert entry.method_details["calibration_images"] >= 1
    import json

    validate_report(json.loads((tmp_path / "rep" / "prune_report.json").read_text()))


def re_search(pattern, text):
    import re

    return re.search(pattern, text) is not None


@pytest.mark.parametrize("overlap, said", [(False, "method auto -> obs"), (True, "method auto -> global")])
def test_auto_choice_is_said_before_training(backend, auto_data, tmp_path, caplog, overlap, said):
    """Fail fast: which method `auto` will use (and why) is logged by the pre-training checks."""
    from yolo_prune_plugin.api import preflight, train_opt
    from yolo_prune_plugin.config import PruneConfig

    data = same_split(auto_data, tmp_path) if overlap else auto_data
    from pathlib import Path

    cfg = str(Path(backend.root) / "models" / "yolov5n.yaml")
    opt = train_opt([], backend, data=str(data), weights="", cfg=cfg, imgsz=64, epochs=1)
    with caplog.at_level("INFO", logger="yolo_prune_plugin"), driving_yolov5(backend):
        preflight(opt, PruneConfig(), backend)
    assert said in caplog.text
