"""backend/loading.py: safe loading through the allow-list (both class spellings), bad files (the compat patches:
test_patches.py)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from yolo_prune_plugin.backend.loading import TRUST_ENV, allowed_globals, load_checkpoint
from yolo_prune_plugin.errors import CheckpointError, UnsafeCheckpointError

from testkit import SHARED_WEIGHTS, save_checkpoint


class _Evil:
    """Unpickling this runs a shell command (the classic malicious-checkpoint payload)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Custom:
    """A harmless user class that is not on the allow-list."""

    def __init__(self):
        self.x = 1


def test_loads_upstream_spelled_checkpoint(backend, shared):
    ckpt = load_checkpoint(SHARED_WEIGHTS)  # pickled by an upstream checkout as models.yolo.Model
    # ... resolved to the classes of the YOLOv5 in use, so YOLOv5's isinstance checks (fuse) work
    assert type(ckpt["model"]) is backend.yolo.DetectionModel
    assert sum(isinstance(m, torch.nn.Conv2d) for m in ckpt["model"].modules()) == 60
    fused = ckpt["model"].float().fuse()
    assert not any(type(m).__name__ == "BatchNorm2d" for m in fused.modules())


def test_loads_pip_spelled_checkpoint(small_ckpt):
    ckpt = load_checkpoint(small_ckpt)
    assert type(ckpt["model"]).__module__.startswith("yolov5.models")


def test_yolov5_own_attempt_load_works_with_allow_list(backend, small_ckpt):
    model = backend.attempt_load(small_ckpt, "cpu")  # YOLOv5's torch.load with weights_only=True default
    assert model.nc == 3


@pytest.mark.parametrize("loader", ["plugin", "yolov5"])
def test_malicious_pickle_is_refused_and_not_executed(backend, small_model, tmp_path, loader):
    marker = tmp_path / "pwned"
    path = save_checkpoint(small_model, tmp_path / "evil.pt", payload=_Evil(marker))
    if loader == "plugin":
        with pytest.raises(UnsafeCheckpointError, match=r"evil.pt: refused to load: its pickle references .*system"):
            load_checkpoint(path)
    else:
        with pytest.raises(pickle.UnpicklingError):
            backend.attempt_load(path, "cpu")
    assert not marker.exists()


def test_allow_list_holds_only_classes_and_numpy_rebuilders(backend):
    import builtins
    import subprocess

    entries = [e[0] if isinstance(e, tuple) else e for e in allowed_globals(backend)]
    for bad in (os.system, eval, exec, builtins.getattr, subprocess.Popen, pickle.loads):
        assert bad not in entries
    names = {e[1] for e in allowed_globals(backend) if isinstance(e, tuple)}
    # both spellings of YOLOv5's classes are covered, and the v6.x alias
    assert {"models.common.Conv", "yolov5.models.common.Conv", "models.yolo.Model"} <= names
    assert all(isinstance(e, type) for e in entries if e not in np_rebuilders())


def np_rebuilders():
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return (core.multiarray._reconstruct, core.multiarray.scalar)


def test_custom_class_refused_by_default_and_loads_with_opt_out(small_model, tmp_path, monkeypatch):
    path = save_checkpoint(small_model, tmp_path / "custom.pt", extra_obj=_Custom())
    with pytest.raises(UnsafeCheckpointError, match="_Custom.*--trust-checkpoint"):
        load_checkpoint(path)
    monkeypatch.setenv(TRUST_ENV, "1")
    assert isinstance(load_checkpoint(path)["extra_obj"], _Custom)


def _write(path, data):
    path.write_bytes(data)
    return path


def _truncated(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize("make,match", [
    (lambda d, ck: d / "missing.pt", r"missing.pt: no such file"),
    (lambda d, ck: d, r"is a directory"),
    (lambda d, ck: _truncated(ck, d / "trunc.pt"), r"trunc.pt: corrupted, truncated or not a torch checkpoint"),
    (lambda d, ck: _write(d / "junk.pt", b"\x00garbage" * 10), r"junk.pt: corrupted"),
    # plain text: torch's unpickler fails with an IndexError, not one of its usual errors
    (lambda d, ck: _write(d / "text.pt", b"the user's own file"), r"text.pt: corrupted, truncated or not a torch "
                                                                  r"checkpoint \(IndexError"),
    (lambda d, ck: torch.save(torch.load(ck, weights_only=False)["model"].state_dict(), d / "sd.pt") or d / "sd.pt",
     r"sd.pt: not a YOLOv5 checkpoint \(no 'model' or 'ema' entry"),
    (lambda d, ck: torch.save([1, 2], d / "list.pt") or d / "list.pt", r"list.pt: not a YOLOv5 checkpoint .*got list"),
    (lambda d, ck: torch.save({"model": torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))}, d / "seq.pt") or d / "seq.pt",
     r"seq.pt: not a YOLOv5 detection model"),
])
def test_bad_files_give_one_line_errors(small_ckpt, tmp_path, make, match):
    d = tmp_path / "cases"
    d.mkdir()
    path = make(d, small_ckpt)
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_classification_model_is_not_a_detection_checkpoint(backend, small_model, tmp_path):
    cls_model = backend.yolo.ClassificationModel(model=small_model, nc=5, cutoff=10)
    torch.save({"model": cls_model.half(), "ema": None}, tmp_path / "cls.pt")
    with pytest.raises(CheckpointError, match="cls.pt: not a YOLOv5 detection model"):
        load_checkpoint(tmp_path / "cls.pt")


@pytest.mark.parametrize("cfg", ["yolov5n.yaml", "hub/yolov5n6.yaml", "hub/yolov5s-ghost.yaml",
                                 "hub/yolov5s-transformer.yaml"])
@pytest.mark.parametrize("with_state", [False, True])
def test_real_checkpoint_shapes_load(backend, tmp_path, cfg, with_state):
    """Every YOLOv5 detection layout (P5/P6) with and without EMA and optimizer state, as train.py saves them."""
    import numpy as np

    torch_utils = __import__(backend.prefix + "utils.torch_utils", fromlist=["ModelEMA"])
    model = backend.yolo.Model(str(backend.root / "models" / cfg), nc=2)
    model.nc = 2  # train.py attaches it
    ckpt = {"epoch": 3, "best_fitness": np.array([0.5]), "model": model.half(), "ema": None, "updates": None,
            "optimizer": None, "opt": {"data": "x.yaml", "imgsz": 640}, "date": "2026-01-01"}
    if with_state:
        opt = torch.optim.SGD(model.float().parameters(), lr=0.1, momentum=0.9)
        model(torch.zeros(2, 3, 64, 64))[0].sum().backward()  # one real step: optimizer state exists
        opt.step()
        ema = torch_utils.ModelEMA(model)
        ckpt.update(model=model.half(), ema=ema.ema.half(), updates=ema.updates, optimizer=opt.state_dict())
    torch.save(ckpt, tmp_path / "ck.pt")
    loaded = load_checkpoint(tmp_path / "ck.pt")
    assert loaded["epoch"] == 3 and (loaded["ema"] is not None) is with_state
    assert backend.attempt_load(tmp_path / "ck.pt", "cpu").nc == 2
