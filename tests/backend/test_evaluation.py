"""evaluation.py: data YAML checks before YOLOv5 sees them, metrics, NMS time-limit reporting."""

from __future__ import annotations

import logging

import pytest
import yaml

from yolo_prune_plugin.errors import ConfigError
from yolo_prune_plugin.backend.evaluation import Metrics, NMSTimeoutCounter, resolve_data, write_absolute_data_yaml


def test_relative_path_is_explained(backend, shared, tmp_path):
    rel = tmp_path / "coco8.yaml"
    rel.write_text((shared / "data" / "coco8.yaml").read_text())  # `path: coco8`, relative
    with pytest.raises(ConfigError, match=r"'path: coco8' is relative, and YOLOv5 resolves it against its own folder"):
        resolve_data(rel)


def test_write_absolute_data_yaml(backend, shared, tmp_path):
    out = write_absolute_data_yaml(shared / "data" / "coco8.yaml", tmp_path)
    assert yaml.safe_load(out.read_text())["path"] == str((shared / "data" / "coco8").resolve())
    data = resolve_data(out)
    assert data["nc"] == 80 and data["val"].endswith("images/val")


@pytest.mark.parametrize("text,match", [
    ("train: a\nnames: {0: x}\n", "lacks 'val'"),
    ("[1, 2]\n", "expected a YOLOv5 dataset mapping"),
    ("train: [\n", "not valid YAML"),
])
def test_bad_data_yaml(backend, tmp_path, text, match):
    f = tmp_path / "d.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        resolve_data(f)


def test_missing_split_is_config_error(backend, tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames: {{0: a}}\n")
    with pytest.raises(ConfigError, match="d.yaml: not a usable YOLOv5 dataset"):
        resolve_data(f)


def test_metrics_from_yolov5_results():
    m = Metrics.from_results((0.5, 0.25, 0.6, 0.4, 0.1, 0.2, 0.3), nms_timeouts=2)
    assert m.to_dict() == {"P": 0.5, "R": 0.25, "mAP50": 0.6, "mAP50-95": 0.4, "nms_timeouts": 2}
    assert "nms_timeouts" not in Metrics.from_results((0, 0, 0, 0)).to_dict()


def test_nms_timeout_counter(backend):
    counter = NMSTimeoutCounter()
    log = logging.getLogger(backend.general.LOGGING_NAME)
    log.addHandler(counter)
    try:
        backend.general.LOGGER.warning("WARNING ⚠️ NMS time limit 0.550s exceeded")
        backend.general.LOGGER.warning("something else")
    finally:
        log.removeHandler(counter)
    assert counter.count == 1
