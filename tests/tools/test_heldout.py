"""Held-out evaluation (issue 11): calibration never reads evaluation images, YOLOv5's NMS time limit cannot
change the plugin's metrics, held-out split YAMLs, and the custom corn-pest model end to end."""

from __future__ import annotations


import pytest
import yaml

from yolo_prune_plugin.prune.calibration import check_disjoint
from yolo_prune_plugin.errors import ConfigError
from yolo_prune_plugin.backend.data import image_files
from yolo_prune_plugin.tools.heldout import retarget_data_yaml, split_data_yaml



# ---------------------------------------------------------------------------------------------------
# calibration and evaluation images are disjoint
# ---------------------------------------------------------------------------------------------------


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
    subset = tmp_path / "test16.txt"  # 16 of the 117 never-seen test images keep the test short
    subset.write_text("".join(f"{f}\n" for f in image_files(d["val"])[:16]))
    data = tmp_path / "data" / "cornpest-test16.yaml"
    data.write_text(yaml.safe_dump({**d, "val": str(subset)}))
    src = load_checkpoint(weights)
    names = dict((src.get("ema") or src["model"]).names)
    assert len(names) == 4
    local = tmp_path / "best.pt"
    local.write_bytes(weights.read_bytes())  # the pruned file is written beside the weights
    [entry] = api.prune(local, data, imgsz=416, batch_size=16, device="cpu", workers=0, method="obs", amount=0.5,
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


# ---------------------------------------------------------------------------------------------------
# method: auto (the default): obs on held-out calibration images, else global
# ---------------------------------------------------------------------------------------------------


