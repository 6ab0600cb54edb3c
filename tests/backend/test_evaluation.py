"""evaluation.py: data YAML checks before YOLOv5 sees them, metrics, NMS time-limit reporting."""

from __future__ import annotations

import copy
import time

import logging

import pytest
import yaml

from yolo_prune_plugin.errors import ConfigError
from yolo_prune_plugin.backend.evaluation import Metrics, NMSTimeoutCounter, resolve_data, write_absolute_data_yaml

from testkit import data_yaml


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


class _RacingClock:
    """Stands in for the ``time`` module seen by YOLOv5's NMS: every ``time()`` call is one second later, so YOLOv5's
    per-batch time limit (0.5 + 0.05 * batch s) runs out after the first image of each batch, without sleeping."""

    def __init__(self, real):
        self._real, self._t = real, real.time()

    def time(self):
        self._t += 1.0
        return self._t

    def __getattr__(self, name):
        return getattr(self._real, name)


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
    from yolo_prune_plugin.backend.evaluation import no_nms_time_limit
    from yolo_prune_plugin.backend.evaluation import evaluate

    model, settings, batches = coco8_eval
    normal = evaluate(copy.deepcopy(model), settings, batches, backend)
    assert normal.map > 0 and normal.nms_time_limit == "lifted" and normal.to_dict()["nms_time_limit"] == "lifted"
    orig = backend.val.non_max_suppression
    racing = _RacingClock(time)
    monkeypatch.setitem(orig.__globals__, "time", racing)
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
    assert backend.val.non_max_suppression.__globals__["time"] is racing  # the clock it had, not the frozen one


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
