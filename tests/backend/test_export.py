"""export.py: real YOLOv5 exports of a pruned model keep its zeros and outputs; failures never touch the weights."""

from __future__ import annotations

import copy
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.utils import prune

from yolo_prune_plugin.errors import ConfigError, OutputExistsError
from yolo_prune_plugin.backend.export import EXTRA_HINT, check_export_requirements, export_and_verify
from yolo_prune_plugin.backend.artifacts import SUPPORTED_FORMATS, verify_artifact

IMGSZ = 64  # smallest size with all three Detect grids (stride 32): keeps the file fast
FORMATS = ["onnx", "torchscript"]
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript"}


def l1_prune(model: torch.nn.Module, amount: float = 0.5) -> torch.nn.Module:
    """Global unstructured L1 pruning of every Conv2d weight, made permanent (independent of prune/unstructured.py)."""
    params = [(m, "weight") for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    for m, name in params:
        prune.remove(m, name)
    return model


def save_ckpt(model: torch.nn.Module, path: Path) -> Path:
    """Save like YOLOv5's strip_optimizer: fp16 model, no EMA."""
    m = copy.deepcopy(model).half()
    for p in m.parameters():
        p.requires_grad_(False)
    torch.save({"epoch": -1, "best_fitness": None, "model": m, "ema": None, "updates": None, "optimizer": None,
                "opt": {}, "date": "2026-01-01T00:00:00"}, path)
    return path


def conv_zeros_in_checkpoint(path: Path) -> tuple[int, int]:
    """(zeros, total) over the Conv2d weights of the checkpoint's model, as saved (unfused)."""
    from yolo_prune_plugin.backend.loading import load_checkpoint

    ws = [m.weight for m in load_checkpoint(path)["model"].modules() if isinstance(m, torch.nn.Conv2d)]
    return sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> dict[str, str]:
    return {p.name: sha(p) if p.is_file() else "<dir>" for p in folder.iterdir()}


pytestmark = pytest.mark.usefixtures("one_thread")  # exports run many small convs


@pytest.fixture(scope="module")
def ckpts(_small_model, tmp_path_factory) -> dict[str, Path]:
    """A dense and a 50%-pruned small YOLOv5n (3 classes), saved as YOLOv5 checkpoints, in separate folders."""
    root = tmp_path_factory.mktemp("export")
    (root / "dense").mkdir()
    (root / "run").mkdir()
    dense = save_ckpt(_small_model, root / "dense" / "best.pt")
    pruned = save_ckpt(l1_prune(copy.deepcopy(_small_model).float()), root / "run" / "best_pruned.pt")
    for sibling in ("best.pt", "last.pt"):
        (root / "run" / sibling).write_bytes(dense.read_bytes())
    return {"dense": dense, "pruned": pruned}


@pytest.fixture(scope="module")
def exported(ckpts):
    """Both formats of the pruned model, exported over stale artefacts of the same names (overwrite=True)."""
    pruned = ckpts["pruned"]
    for fmt in FORMATS:
        pruned.with_suffix(SUFFIX[fmt]).write_bytes(b"stale")
    reports = export_and_verify(pruned, FORMATS, imgsz=IMGSZ)
    return {r.format: r for r in reports}


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_keeps_zeros_and_outputs(ckpts, exported, fmt):
    r = exported[fmt]
    zeros, total = conv_zeros_in_checkpoint(ckpts["pruned"])
    assert zeros == total // 2
    assert r.ok and r.written, r.message
    assert r.path == str(ckpts["pruned"].with_suffix(SUFFIX[fmt]))
    out = Path(r.path)
    assert out.read_bytes() != b"stale"  # overwrite=True replaced the stale file
    assert (r.conv_weights, r.zeros, r.expected_zeros, r.expected_conv_weights) == (total, zeros, zeros, total)
    assert r.sparsity == pytest.approx(0.5, abs=1e-6)
    assert r.max_abs_diff is not None and r.max_abs_diff <= 1e-3
    assert r.bytes == out.stat().st_size
    assert 0 < r.gzip_bytes < 0.75 * r.bytes  # half the fp32 weights are zeros: gzip pays off
    d = r.to_dict()
    assert d["format"] == fmt and d["ok"] is True and d["sparsity"] == pytest.approx(0.5)


def test_export_writes_only_the_artifacts(ckpts, exported):
    folder = ckpts["pruned"].parent
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["best.pt", "last.pt", "best_pruned.pt", "best_pruned.onnx", "best_pruned.torchscript"])


def test_dynamic_onnx_non_square(ckpts, tmp_path):
    """dynamic=True: symbolic input dims; verification then runs at the imgsz given ([h, w])."""
    import onnx

    weights = tmp_path / "best_pruned.pt"
    weights.write_bytes(ckpts["pruned"].read_bytes())
    [r] = export_and_verify(weights, "onnx", imgsz=[64, 96], dynamic=True, opset=13)
    assert r.ok and r.written, r.message
    m = onnx.load(r.path)
    assert m.opset_import[0].version == 13
    assert [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim] == ["batch", "", "height", "width"]
    assert r.zeros == r.expected_zeros and r.max_abs_diff <= 1e-3


@pytest.fixture(scope="module")
def dense_artifacts(ckpts):
    reports = export_and_verify(ckpts["dense"], FORMATS, imgsz=IMGSZ)
    assert all(r.ok for r in reports), [r.message for r in reports]
    return {r.format: Path(r.path) for r in reports}


@pytest.mark.parametrize("fmt", FORMATS)
def test_dense_artifact_fails_against_pruned_model(ckpts, dense_artifacts, fmt):
    r = verify_artifact(dense_artifacts[fmt], ckpts["pruned"], atol=1e-3)
    assert not r.ok
    assert r.zeros < r.expected_zeros
    assert "zeros did not survive" in r.message
    # positive control: the same artefact against its own (dense) model passes, also from an in-memory model
    from yolo_prune_plugin.backend.loading import load_checkpoint

    model = ckpts["dense"] if fmt == "onnx" else load_checkpoint(ckpts["dense"])["model"]  # path or in-memory
    assert verify_artifact(dense_artifacts[fmt], model).ok


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_missing_export_extra(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install yolo_prune_plugin\[export\]") as e:
        check_export_requirements(["onnx"])
    assert missing in str(e.value)
    assert EXTRA_HINT in str(e.value)
    check_export_requirements(["torchscript"])  # needs no extra


@pytest.mark.parametrize("formats, pattern", [
    (["onnxx"], "unknown"),
    (["torchscript", "saved_model"], "cannot verify"),  # a YOLOv5 format the plugin does not verify
    ([], "none given"),
])
def test_unknown_format_rejected_before_export(ckpts, formats, pattern):
    before = listing(ckpts["pruned"].parent)
    with pytest.raises(ConfigError, match=pattern) as e:
        export_and_verify(ckpts["pruned"], formats, imgsz=IMGSZ)
    assert ", ".join(SUPPORTED_FORMATS) in str(e.value)
    assert listing(ckpts["pruned"].parent) == before


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(half=True, device="cpu"), "CUDA"),
    (dict(atol=-1.0), "atol"),
    (dict(imgsz=0), "imgsz"),
])
def test_bad_options_rejected(ckpts, kwargs, pattern):
    kwargs = {"imgsz": IMGSZ, **kwargs}
    with pytest.raises(ConfigError, match=pattern):
        export_and_verify(ckpts["pruned"], ["torchscript"], **kwargs)


def _onnx_export_raises(monkeypatch, backend):
    def boom(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(torch.onnx, "export", boom)
    return "exporter exploded"


def _exporter_densifies(monkeypatch, backend):
    """An exporter that loses the zeros: every Conv weight gets a tiny offset before export."""
    original = backend.export.attempt_load

    def attempt_load(*args, **kwargs):
        model = original(*args, **kwargs)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Conv2d):
                    m.weight.add_(1e-6)
        return model

    monkeypatch.setattr(backend.export, "attempt_load", attempt_load)
    return "zeros did not survive"


@pytest.mark.parametrize("failure", [_onnx_export_raises, _exporter_densifies])
def test_failed_export_touches_nothing(backend, ckpts, monkeypatch, failure):
    folder = ckpts["pruned"].parent
    old = folder / "best_pruned.onnx"
    if not old.exists():
        old.write_bytes(b"previous artefact")
    before = listing(folder)
    expected = failure(monkeypatch, backend)
    [r] = export_and_verify(ckpts["pruned"], ["onnx"], imgsz=IMGSZ)
    assert not r.ok and not r.written
    assert expected in r.message and "not written" in r.message
    assert listing(folder) == before  # weights, best.pt, last.pt, the old artefact: byte-identical; no temp dir


def test_refuses_to_clobber(ckpts):
    folder = ckpts["pruned"].parent
    target = folder / "best_pruned.torchscript"
    if not target.exists():
        target.write_bytes(b"keep me")
    before = listing(folder)
    with pytest.raises(OutputExistsError, match="best_pruned.torchscript"):
        export_and_verify(ckpts["pruned"], ["onnx", "torchscript"], imgsz=IMGSZ, overwrite=False)
    assert listing(folder) == before


def test_shared_yolov5n_onnx_detects(backend, shared, tmp_path):
    """The released yolov5n (pickled as ``models.yolo``), 50% pruned: verified ONNX detects on a coco128 image."""
    import importlib

    import cv2
    import onnxruntime as ort

    from yolo_prune_plugin.backend.loading import load_checkpoint

    src = shared / "weights" / "yolov5n.pt"
    model = l1_prune(load_checkpoint(src)["model"].float())
    weights = save_ckpt(model, tmp_path / "best_pruned.pt")
    [r] = export_and_verify(weights, ["onnx"], imgsz=320)
    assert r.ok and r.written, r.message
    assert r.zeros == r.expected_zeros == conv_zeros_in_checkpoint(weights)[0]
    assert r.max_abs_diff <= 1e-3

    letterbox = importlib.import_module(backend.prefix + "utils.augmentations").letterbox
    img = cv2.imread(str(shared / "data" / "coco128" / "images" / "train2017" / "000000000009.jpg"))
    im = letterbox(img, 320, auto=False)[0][:, :, ::-1].transpose(2, 0, 1)  # BGR HWC -> RGB CHW
    im = np.ascontiguousarray(im, dtype=np.float32)[None] / 255.0
    import onnx

    assert "BatchNormalization" not in {n.op_type for n in onnx.load(r.path).graph.node}  # fused despite spelling
    sess = ort.InferenceSession(r.path, providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["output0"]
    pred = sess.run(None, {sess.get_inputs()[0].name: im})[0]
    det = backend.general.non_max_suppression(torch.from_numpy(pred), conf_thres=0.25, iou_thres=0.45)[0]
    assert len(det) >= 1


def test_artifacts_are_fused_single_output(exported):
    """BatchNorm is fused into the convs and Detect is in export mode (one prediction output)."""
    import onnx

    g = onnx.load(exported["onnx"].path).graph
    ops = {n.op_type for n in g.node}
    assert "Conv" in ops and "BatchNormalization" not in ops
    assert [o.name for o in g.output] == ["output0"]
    ts = torch.jit.load(exported["torchscript"].path)
    assert not [n for n, m in ts.named_modules() if getattr(m, "original_name", "") == "BatchNorm2d"]
    y = ts(torch.zeros(1, 3, IMGSZ, IMGSZ))
    assert isinstance(y, tuple) and len(y) == 1 and y[0].shape[-1] == 5 + 3
