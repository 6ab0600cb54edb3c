"""prune/calibration.py: calibration images from the train split only, the train/val overlap check, and method: auto."""

from __future__ import annotations

import pytest
import torch
import yaml

from yolo_prune_plugin.backend.patches import driving_yolov5
from yolo_prune_plugin.errors import ConfigError
from yolo_prune_plugin.prune.calibration import check_disjoint, load_calibration_batch, load_calibration_images

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


@pytest.mark.parametrize("value, ok", [(True, True), (False, True), ("yes", False), (1, False)])
def test_allow_overlap_config_key(value, ok):
    from yolo_prune_plugin.config import config_from_dict

    if ok:
        assert config_from_dict({"calibration": {"allow_overlap": value}}).calibration.allow_overlap is value
    else:
        with pytest.raises(ConfigError, match=r"'calibration\.allow_overlap' must be true or false"):
            config_from_dict({"calibration": {"allow_overlap": value}})


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


@pytest.mark.parametrize("imgsz, n", [(64, 3), (96, 10)])
def test_calibration_from_train_split(backend, coco8_yaml, shared, imgsz, n):
    data = coco8_yaml
    x = load_calibration_images(data, imgsz, n=n, seed=0)
    assert x.dtype == torch.float32 and x.shape == (min(n, 4), 3, imgsz, imgsz)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.05
    assert torch.equal(x, load_calibration_images(data, imgsz, n=n, seed=0))  # deterministic
    # the same images whether given the YAML or YOLOv5's check_dataset dict
    with driving_yolov5(backend):  # YOLOv5 called directly: offline font etc.
        d = backend.general.check_dataset(str(data))
    assert torch.equal(x, load_calibration_images(d, imgsz, n=n, seed=0))
    # every image is a letterboxed TRAIN image, none a val image
    import importlib

    dl = importlib.import_module(backend.prefix + "utils.dataloaders")

    def split(name):
        ds = dl.LoadImagesAndLabels(str(shared / "data" / "coco8" / "images" / name), imgsz, augment=False, rect=False)
        return [ds[i][0].float() / 255 for i in range(len(ds))]

    train, val = split("train"), split("val")
    for im in x:
        assert any(torch.equal(im, t) for t in train)
        assert not any(torch.equal(im, v) for v in val)


def test_calibration_seed_picks_images(coco8_yaml):
    data = coco8_yaml
    picks = {tuple(float(im.sum()) for im in load_calibration_images(data, 64, n=2, seed=s)) for s in range(6)}
    assert len(picks) > 1


@pytest.mark.parametrize("train_entry", ["images/train", "images/missing"])
def test_calibration_empty_or_missing_train_split(tmp_path, train_entry):
    root = tmp_path / "ds"
    (root / "images" / "train").mkdir(parents=True)
    (root / "images" / "val").mkdir(parents=True)
    data = tmp_path / "empty.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": train_entry, "val": "images/val",
                                    "names": {0: "a"}}))
    with pytest.raises(ConfigError, match=r"empty\.yaml.*train split"):
        load_calibration_images(data, 64, n=2)


def test_calibration_missing_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_calibration_images(tmp_path / "nope.yaml", 64)
