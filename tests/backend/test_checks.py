"""checks.py: the early checks of files, device and class count (one-line messages, before any work)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest
import torch

from yolo_prune_plugin.backend import checks
from yolo_prune_plugin.backend.checks import (RELEASE_WEIGHTS, available_devices, check_device, check_file_path,
                                              check_model_matches_data, check_user_paths, check_weights_path)
from yolo_prune_plugin.errors import CheckpointError, ConfigError


# -- files ------------------------------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path):
    w = tmp_path / "best.pt"
    w.write_bytes(b"x")
    d = tmp_path / "data.yaml"
    d.write_text("train: x\n")
    c = tmp_path / "prune.yaml"
    c.write_text("amount: 0.3\n")
    return w, d, c


@pytest.mark.parametrize("value", [None, "", "https://example.com/w.pt", "http://host/x.pt"])
def test_weights_absent_or_url_is_not_checked(value):
    check_weights_path(value)


def test_existing_weights_file_passes(files):
    check_weights_path(str(files[0]))


def test_missing_weights_is_checkpoint_error_naming_file_and_flag(tmp_path):
    p = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{p}: no such file (--weights expects a YOLOv5 .pt")):
        check_weights_path(str(p))
    with pytest.raises(CheckpointError, match=r"\(--teacher expects"):
        check_weights_path(str(p), flag="--teacher")


def test_weights_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{tmp_path}: is a directory (--weights expects")):
        check_weights_path(str(tmp_path))


@pytest.mark.parametrize("name,release", [("yolov5s.pt", True), ("yolov5n6.pt", True), ("yolov5m-seg.pt", True),
                                          ("yolov5x6-cls.pt", True), ("yolov5q.pt", False), ("yolov5s.pth", False),
                                          ("my_yolov5s.pt", False), ("yolov8n.pt", False)])
def test_release_names_pass_only_when_allowed(name, release, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no such file here
    assert bool(RELEASE_WEIGHTS.match(name)) is release
    if release:
        check_weights_path(name, allow_release=True)
    else:
        with pytest.raises(CheckpointError, match=re.escape(f"{name}: no such file")):
            check_weights_path(name, allow_release=True)
    with pytest.raises(CheckpointError, match="no such file"):  # prune/eval: a local file is required
        check_weights_path(name)


def test_file_path_accepts_files_none_and_urls(files):
    check_file_path(str(files[1]), "--data", "data YAML")
    check_file_path(None, "--data", "data YAML")
    check_file_path("https://example.com/d.yaml", "--data", "data YAML")


def test_file_path_missing_and_directory(tmp_path):
    with pytest.raises(ConfigError, match="^" + re.escape(f"--data {tmp_path / 'x.yaml'}: data YAML not found")):
        check_file_path(str(tmp_path / "x.yaml"), "--data", "data YAML")
    with pytest.raises(ConfigError, match="^" + re.escape(f"--config {tmp_path}: is a directory (expected prune "
                                                          "config YAML)")):
        check_file_path(str(tmp_path), "--config", "prune config YAML")


def test_user_paths_all_present_pass(files):
    w, d, c = files
    check_user_paths(weights=str(w), data=str(d), config=str(c))
    check_user_paths()  # nothing given: nothing to check


@pytest.mark.parametrize("which,allow_release,err,match", [
    ("config", False, ConfigError, r"^--config .*missing\.yaml: prune config YAML not found"),
    ("config", True, ConfigError, r"^--prune-config .*missing\.yaml: prune config YAML not found"),
    ("weights", False, CheckpointError, r"missing\.yaml: no such file \(--weights"),
    ("data", False, ConfigError, r"^--data .*missing\.yaml: data YAML not found"),
])
def test_user_paths_name_the_flag_of_the_bad_one(files, tmp_path, which, allow_release, err, match):
    w, d, c = files
    given = {"weights": str(w), "data": str(d), "config": str(c), which: str(tmp_path / "missing.yaml")}
    with pytest.raises(err, match=match):
        check_user_paths(**given, allow_release=allow_release)


def test_check_user_paths_runs_before_yolov5_is_imported(tmp_path):
    """The file checks run before YOLOv5 loads: a typo is reported without importing it. (torch is imported by the
    package's ``__init__``, so only YOLOv5 is asserted here.)"""
    code = ("import sys\nfrom yolo_prune_plugin.backend.checks import check_user_paths\n"
            f"try:\n    check_user_paths(weights={str(tmp_path / 'typo.pt')!r})\n"
            "except Exception as e:\n    print(type(e).__name__, 'yolov5' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["CheckpointError", "False"]


# -- device -----------------------------------------------------------------------------------------------
def test_available_devices_start_with_cpu():
    devs = available_devices()
    assert devs[0] == "cpu"
    assert ([d for d in devs if d.isdigit()] == [str(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else not any(d.isdigit() for d in devs))


@pytest.mark.parametrize("device", ["", None, "cpu", "CPU", " cpu ", torch.device("cpu")])
def test_cpu_and_auto_pass(device):
    check_device(device)


@pytest.mark.parametrize("device", ["gpu", "0,x", ",", "cuda:a", "tpu"])
def test_malformed_device_is_refused_listing_what_is_available(device):
    avail = ", ".join(available_devices())
    with pytest.raises(ConfigError, match="^" + re.escape(f"--device {device}: expected cpu, mps or CUDA device ids")
                       + ".*" + re.escape(f"available: {avail}")):
        check_device(device)


@pytest.mark.parametrize("device", ["0", "cuda", "cuda:0", "0,1", torch.device("cuda", 0)])
def test_cuda_without_cuda_is_refused(device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"CUDA is not available on this machine \((torch was built without CUDA|"
                                          r"no CUDA GPU is visible)\); available: cpu"):
        check_device(device, flag="--eval-device")


def test_cuda_index_beyond_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("0,1")
    check_device("cuda:1")
    with pytest.raises(ConfigError, match=r"^--device 1,3: CUDA device 3 does not exist \(2 GPU\(s\) visible\); "
                                          r"available: cpu, 0, 1"):
        check_device("1,3")


def test_mps_where_absent(monkeypatch):
    class NoMPS:
        @staticmethod
        def is_available():
            return False

    monkeypatch.setattr(torch.backends, "mps", NoMPS)
    with pytest.raises(ConfigError, match=r"^--device mps: Apple MPS is not available on this machine"):
        check_device("mps")
    monkeypatch.setattr(NoMPS, "is_available", staticmethod(lambda: True))
    check_device("MPS")


# -- classes ----------------------------------------------------------------------------------------------
DATA = {"nc": 3, "names": {0: "circle", 1: "rectangle", 2: "triangle"}}


def test_matching_model_passes_quietly(small_model, caplog):
    small_model.names = dict(DATA["names"])
    with caplog.at_level(logging.WARNING, logger="yolo_prune_plugin"):
        check_model_matches_data(small_model, DATA, "w.pt", "data.yaml")
    assert caplog.records == []


def test_class_count_mismatch_names_both_files_and_counts(small_model):
    data = {"nc": 6, "names": [f"c{i}" for i in range(6)]}
    with pytest.raises(ConfigError, match=re.escape("w.pt: the model has 3 classes (circle, square, triangle) but "
                                                    "d.yaml has nc=6 (c0, c1, c2, c3, ...); evaluate on the dataset")):
        check_model_matches_data(small_model, data, "w.pt", "d.yaml")
    check_model_matches_data(small_model, data, "w.pt", "d.yaml", single_cls=True)  # any count for single_cls


def test_class_count_from_the_detect_head_and_default_data_name(small_model):
    del small_model.nc  # read from Detect instead
    small_model.names = None
    with pytest.raises(ConfigError, match=r"^w\.pt: the model has 3 classes but the data YAML has nc=2 \(a, b\)"):
        check_model_matches_data(small_model, {"nc": 2, "names": ["a", "b"]}, "w.pt")


def test_same_count_other_names_warns_with_the_first_difference(small_model, caplog):
    with caplog.at_level(logging.WARNING, logger="yolo_prune_plugin"):
        check_model_matches_data(small_model, DATA, "w.pt", "d.yaml")  # model: circle, square, triangle
    [rec] = caplog.records
    assert rec.levelno == logging.WARNING
    assert ("w.pt: class names differ from d.yaml (class 1: model 'square', data 'rectangle')"
            in rec.getMessage())


def test_names_without_counts_are_not_compared(small_model, caplog):
    del small_model.nc
    small_model.model[-1].nc = None
    with caplog.at_level(logging.WARNING, logger="yolo_prune_plugin"):
        check_model_matches_data(small_model, {"names": ["x"]}, "w.pt")  # no nc anywhere, different name count
    assert caplog.records == []


@pytest.mark.parametrize("names,expected", [
    ({1: "b", 0: "a", 10: "k", 2: "c"}, ["a", "b", "c", "k"]),
    ({"0": "a", "1": "b"}, ["a", "b"]),
    ({"x": "a", "y": "b"}, ["a", "b"]),
    (("a", "b"), ["a", "b"]),
    ("ab", None),
    (None, None),
])
def test_names_list_orders_mappings_by_class_id(names, expected):
    assert checks._names_list(names) == expected
