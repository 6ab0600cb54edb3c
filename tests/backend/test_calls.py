"""calls.py: calls into YOLOv5 matched to the installed layout's signature (PyPI yolov5 7.0.14 vs a current
ultralytics/yolov5 checkout), checked on both: "pypi" is the installed class/function, "upstream" a stand-in with
exactly the upstream signature (copied from ultralytics/yolov5's utils/dataloaders.py, val.py, export.py)."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch
import yaml

from yolo_prune_plugin.backend import calls
from yolo_prune_plugin.backend.calls import LAYOUT_KWARGS, call, supported_kwargs
from yolo_prune_plugin.errors import ConfigError, ExportError, YOLOv5CallError

LAYOUTS = ["pypi", "upstream"]


# --------------------------------------------------------------------------------------------------
# upstream ultralytics/yolov5 signatures (its defaults that need its ROOT are simplified; names and order are its)
# --------------------------------------------------------------------------------------------------
def _upstream_dataset(real: type) -> type:
    """A subclass of the installed ``LoadImagesAndLabels`` whose ``__init__`` has exactly upstream's signature
    (no ``workers``; ``rank`` and ``seed``). It reads labels in this process (the installed class's ``workers=0``
    path) instead of upstream's process pool: the signature is what is under test, not the pool."""

    class LoadImagesAndLabels(real):
        def __init__(self, path, img_size=640, batch_size=16, augment=False, hyp=None, rect=False,
                     image_weights=False, cache_images=False, single_cls=False, stride=32, pad=0.0, min_items=0,
                     prefix="", rank=-1, seed=0):
            super().__init__(path, img_size, batch_size, augment, hyp, rect, image_weights, cache_images,
                             single_cls, stride, pad, min_items, prefix, workers=0)

    LoadImagesAndLabels.__module__ = "utils.dataloaders"  # as an upstream checkout names it
    LoadImagesAndLabels.__qualname__ = "LoadImagesAndLabels"
    return LoadImagesAndLabels


def upstream_create_dataloader(path, imgsz, batch_size, stride, single_cls=False, hyp=None, augment=False, cache=False,
                               pad=0.0, rect=False, rank=-1, workers=8, image_weights=False, quad=False, prefix="",
                               shuffle=False, seed=0):
    raise AssertionError("signature only")


def upstream_val_run(data, weights=None, batch_size=32, imgsz=640, conf_thres=0.001, iou_thres=0.6, max_det=300,
                     task="val", device="", workers=8, single_cls=False, augment=False, verbose=False, save_txt=False,
                     save_hybrid=False, save_conf=False, save_json=False, project="runs/val", name="exp",
                     exist_ok=False, half=True, dnn=False, model=None, dataloader=None, save_dir=Path(""), plots=True,
                     callbacks=None, compute_loss=None):
    raise AssertionError("signature only")


def upstream_export_run(data="data/coco128.yaml", weights="yolov5s.pt", imgsz=(640, 640), batch_size=1, device="cpu",
                        include=("torchscript", "onnx"), half=False, inplace=False, keras=False, optimize=False,
                        int8=False, per_tensor=False, dynamic=False, cache="", simplify=False, mlmodel=False, opset=12,
                        verbose=False, workspace=4, nms=False, agnostic_nms=False, topk_per_class=100, topk_all=100,
                        iou_thres=0.45, conf_thres=0.25):
    raise AssertionError("signature only")


@pytest.fixture
def dl(backend):
    """The backend's ``utils.dataloaders`` module (tests monkeypatch its attributes)."""
    return importlib.import_module(backend.prefix + "utils.dataloaders")


@pytest.fixture
def upstream_dataset(dl):
    return _upstream_dataset(dl.LoadImagesAndLabels)


def _recorder(layout_fn, seen: list, run=None):
    """A callee with ``layout_fn``'s signature (and name) that records what it receives; Python's own binding
    of the arguments is checked as the real call would, then ``run(*args, **kwargs)`` (default: None)."""
    sig = inspect.signature(layout_fn)

    def rec(*args, **kwargs):
        sig.bind(*args, **kwargs)  # what calling the real one would raise TypeError for
        seen.append((args, kwargs))
        return run(*args, **kwargs) if run is not None else None

    rec.__signature__ = sig
    rec.__module__ = layout_fn.__module__
    rec.__qualname__ = layout_fn.__qualname__
    return rec


def _layout(layout, pypi, upstream):
    return pypi if layout == "pypi" else upstream


@pytest.fixture
def train_dir(tiny_data) -> Path:
    return tiny_data.parent / "images" / "train"


# --------------------------------------------------------------------------------------------------
# call(): layout keywords where named, everything else as it is
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_kwargs_reach_only_callees_that_name_them(layout, dl, upstream_dataset, train_dir, monkeypatch):
    cls = _layout(layout, dl.LoadImagesAndLabels, upstream_dataset)
    seen: list = []
    monkeypatch.setattr(dl, "LoadImagesAndLabels", _recorder(cls, seen, run=cls))
    ds = calls.load_images_and_labels(train_dir, 64, batch_size=2, prefix="t: ")
    [(args, kw)] = seen
    assert args == (train_dir, 64)
    common = {"batch_size": 2, "augment": False, "rect": False, "stride": 32, "pad": 0.0, "prefix": "t: "}
    extra = {"workers": 0} if layout == "pypi" else {"rank": -1, "seed": 0}
    assert kw == {**common, **extra}
    assert isinstance(ds, cls) and len(ds) == 4
    if layout == "pypi":
        assert ds.workers == 0  # the installed class really received it


@pytest.mark.parametrize("layout", LAYOUTS)
def test_call_filters_layout_kwargs_on_plain_functions(layout):
    seen = {}

    def pypi(path, imgsz, workers=8):
        seen.update(path=path, imgsz=imgsz, workers=workers)

    def upstream(path, imgsz, rank=-1, seed=0):
        seen.update(path=path, imgsz=imgsz, rank=rank, seed=seed)

    call(_layout(layout, pypi, upstream), "p", 64, workers=0, rank=3, seed=7)
    assert seen == ({"path": "p", "imgsz": 64, "workers": 0} if layout == "pypi"
                    else {"path": "p", "imgsz": 64, "rank": 3, "seed": 7})


def test_supported_kwargs_keeps_everything_for_var_keyword_and_non_layout_names():
    def takes_all(a, **kwargs):
        pass

    def narrow(a, b=1):
        pass

    kw = {"workers": 0, "rank": -1, "per_tensor": True, "b": 2, "typo": 1}
    assert supported_kwargs(takes_all, kw) == kw
    # layout names the callee lacks are dropped; a non-layout name is kept (so a real mistake still fails)
    assert supported_kwargs(narrow, kw) == {"b": 2, "typo": 1}
    assert {"workers", "rank", "seed", "per_tensor", "cache", "mlmodel", "min_items"} == LAYOUT_KWARGS


def test_upstream_mimic_is_faithful(dl, upstream_dataset, train_dir):
    """CONTROL: called directly, the upstream stand-in refuses ``workers`` (and the installed class ``rank``), so
    the layout tests above pass only because call() left them out."""
    with pytest.raises(TypeError, match="workers"):
        upstream_dataset(str(train_dir), 64, workers=0)
    with pytest.raises(TypeError, match="rank"):
        dl.LoadImagesAndLabels(str(train_dir), 64, rank=-1)
    assert "workers" not in inspect.signature(upstream_dataset).parameters
    assert "workers" in inspect.signature(dl.LoadImagesAndLabels).parameters


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unknown_keyword_is_yolov5_call_error_naming_the_function(layout, dl, upstream_dataset, train_dir):
    cls = _layout(layout, dl.LoadImagesAndLabels, upstream_dataset)
    seen: list = []
    rec = _recorder(cls, seen, run=cls)
    name = "yolov5.utils.dataloaders.LoadImagesAndLabels" if layout == "pypi" else "utils.dataloaders.LoadImagesAndLabels"
    with pytest.raises(YOLOv5CallError, match="^" + re.escape(name) + r" does not take these arguments .*imgsz"):
        call(rec, str(train_dir), imgsz=64)  # YOLOv5's keyword is img_size
    with pytest.raises(YOLOv5CallError, match="^" + re.escape(name) + r" does not take .*'bogus'.*supports PyPI yolov5 7\.0\.14"):
        call(rec, str(train_dir), 64, bogus=1, workers=0)
    assert seen == []  # refused before YOLOv5 ran


def test_other_errors_of_the_callee_propagate_unchanged():
    def fn(path, workers=8):
        raise FileNotFoundError(f"{path} does not exist")

    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        call(fn, "nowhere", workers=0)


# --------------------------------------------------------------------------------------------------
# calibration images through call(), on both layouts
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_calibration_images_on_both_layouts(layout, dl, upstream_dataset, tiny_data, monkeypatch, one_thread):
    from yolo_prune_plugin.prune.calibration import load_calibration_images

    reference = load_calibration_images(tiny_data, imgsz=64, n=2)  # the installed class, unpatched
    seen: list = []
    cls = _layout(layout, dl.LoadImagesAndLabels, upstream_dataset)
    monkeypatch.setattr(dl, "LoadImagesAndLabels", _recorder(cls, seen, run=cls))
    x = load_calibration_images(tiny_data, imgsz=64, n=2)
    assert len(seen) == 1 and ("rank" in seen[0][1]) == (layout == "upstream")  # the layout's class read them
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.std()) > 0.01  # real pixels, scaled
    assert torch.equal(x, reference)  # same images, same letterbox, either layout


@pytest.fixture
def empty_train_yaml(tiny_data, tmp_path) -> tuple[Path, Path]:
    empty = tmp_path / "empty_train"
    empty.mkdir()
    y = tmp_path / "empty.yaml"
    y.write_text(yaml.safe_dump({"path": str(tmp_path), "train": str(empty),
                                 "val": str(tiny_data.parent / "images" / "val"), "nc": 3,
                                 "names": {0: "circle", 1: "rectangle", 2: "triangle"}}))
    return y, empty


@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_split_without_images_is_config_error_naming_it(layout, dl, upstream_dataset, empty_train_yaml,
                                                              monkeypatch):
    from yolo_prune_plugin.prune.calibration import load_calibration_images

    y, empty = empty_train_yaml
    monkeypatch.setattr(dl, "LoadImagesAndLabels", _layout(layout, dl.LoadImagesAndLabels, upstream_dataset))
    with pytest.raises(ConfigError, match=r"could not read the train split|has no images") as e:
        load_calibration_images(y, imgsz=64, n=2)
    assert str(empty) in str(e.value) and str(y) in str(e.value)


def test_signature_drift_is_never_blamed_on_the_images(dl, tiny_data, monkeypatch):
    """A LoadImagesAndLabels that takes neither layout's arguments (no stride/pad): YOLOv5CallError, not a
    ConfigError about the train split."""
    seen: list = []

    class LoadImagesAndLabels:
        def __init__(self, path, img_size=640, batch_size=16, augment=False, hyp=None, rect=False, prefix=""):
            seen.append(path)

    from yolo_prune_plugin.prune.calibration import load_calibration_images

    monkeypatch.setattr(dl, "LoadImagesAndLabels", LoadImagesAndLabels)
    with pytest.raises(YOLOv5CallError, match=r"LoadImagesAndLabels does not take these arguments .*'stride'") as e:
        load_calibration_images(tiny_data, imgsz=64, n=2)
    assert not isinstance(e.value, ConfigError)
    assert "could not read" not in str(e.value) and "has no images" not in str(e.value) and seen == []


# --------------------------------------------------------------------------------------------------
# the plugin's call sites of create_dataloader, val.run and export.run bind to both layouts
# --------------------------------------------------------------------------------------------------
def _binds_to_both(args, kwargs, pypi_fn, upstream_fn):
    for fn in (pypi_fn, upstream_fn):
        inspect.signature(fn).bind(*args, **supported_kwargs(fn, kwargs))


@pytest.fixture
def settings(tiny_data):
    from yolo_prune_plugin.backend.evaluation import EvalSettings

    val = str(tiny_data.parent / "images" / "val")
    return EvalSettings({"val": val, "nc": 3, "names": {0: "a", 1: "b", 2: "c"}}, 64, 2, torch.device("cpu"),
                        workers=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_make_dataloader_goes_through_call(layout, backend, dl, settings, monkeypatch):
    from yolo_prune_plugin.backend.evaluation import make_dataloader

    real = dl.create_dataloader
    seen: list = []
    loader = object()
    monkeypatch.setattr(dl, "create_dataloader", _recorder(_layout(layout, real, upstream_create_dataloader), seen,
                                                           run=lambda *a, **k: (loader, "dataset")))
    assert make_dataloader(settings, 32, backend) is loader
    [(args, kw)] = seen
    assert args == (settings.data["val"], 64, 2, 32)
    assert kw["rect"] is True and kw["pad"] == 0.5 and kw["workers"] == 0 and kw["rank"] == -1
    _binds_to_both(args, kw, real, upstream_create_dataloader)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_evaluate_goes_through_call(layout, backend, settings, small_model, monkeypatch):
    from yolo_prune_plugin.backend.evaluation import evaluate

    real = backend.val.run
    seen: list = []
    loader = object()
    monkeypatch.setattr(backend.val, "run", _recorder(_layout(layout, real, upstream_val_run), seen,
                                                      run=lambda *a, **k: ((0.5, 0.25, 0.6, 0.4, 0, 0, 0), None, None)))
    m = evaluate(small_model, settings, dataloader=loader, backend=backend)
    assert (m.precision, m.recall, m.map50, m.map) == (0.5, 0.25, 0.6, 0.4)
    [(args, kw)] = seen
    assert args == (settings.data,) and kw["dataloader"] is loader and kw["model"] is small_model
    assert kw["batch_size"] == 2 and kw["imgsz"] == 64 and not {"batch", "img"} & set(kw)  # 7.0.14-only aliases
    _binds_to_both(args, kw, real, upstream_val_run)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_goes_through_call(layout, backend, small_ckpt, monkeypatch):
    from yolo_prune_plugin.backend.export import export_and_verify

    real = backend.export.run
    seen: list = []
    monkeypatch.setattr(backend.export, "run", _recorder(_layout(layout, real, upstream_export_run), seen))
    [report] = export_and_verify(small_ckpt, ["torchscript"], imgsz=64, opset=12, backend=backend)
    assert not report.ok and not report.written and "no file was written" in report.message  # the stub wrote none
    [(args, kw)] = seen
    assert args == () and Path(kw["weights"]).name == small_ckpt.name and kw["include"] == ("torchscript",)
    assert kw["imgsz"] == [64, 64] and kw["opset"] == 12 and "img" not in kw
    _binds_to_both(args, kw, real, upstream_export_run)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bench_export_goes_through_call(layout, backend, small_ckpt, tmp_path, monkeypatch):
    from yolo_prune_plugin.tools import bench

    real = backend.export.run
    seen: list = []
    monkeypatch.setattr(backend.export, "run", _recorder(_layout(layout, real, upstream_export_run), seen))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ExportError, match="ONNX export failed"):
        bench._export_onnx(backend, small_ckpt, work, 64, 2)  # the stub writes no .onnx
    [(args, kw)] = seen
    assert kw == {"weights": str(work / small_ckpt.name), "imgsz": [64, 64], "batch_size": 2, "device": "cpu",
                  "include": ("onnx",)}
    _binds_to_both(args, kw, real, upstream_export_run)
