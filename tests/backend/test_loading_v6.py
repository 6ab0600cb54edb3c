"""Checkpoints of older YOLOv5 releases (v6.0-v6.2: ``Detect.anchor_grid`` a tensor, attributes of older torch
missing) prune with every method and structure, and the plugin's numbers equal YOLOv5's ``val.run`` on the file."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from yolo_prune_plugin.backend.evaluation import no_nms_time_limit
from yolo_prune_plugin.backend.loading import load_checkpoint, repair_compat
from yolo_prune_plugin.backend.patches import driving_yolov5

from testkit import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def make_v6_model(model: nn.Module) -> nn.Module:
    """``model`` (v7) turned into what a v6.0 file unpickles to: ``anchor_grid`` a tensor buffer, no ``inplace`` on
    the activations and the head, no ``Upsample.recompute_scale_factor``."""
    m = copy.deepcopy(model)
    det = m.model[-1]
    del det.anchor_grid
    grid = (det.anchors * det.stride.view(-1, 1, 1)).view(det.nl, 1, -1, 1, 1, 2)
    det.register_buffer("anchor_grid", grid.clone())
    del det.inplace
    for mod in m.modules():
        if isinstance(mod, (nn.SiLU, nn.ReLU, nn.LeakyReLU)):
            del mod.inplace
        if isinstance(mod, nn.Upsample):
            del mod.recompute_scale_factor
    return m


@pytest.fixture(scope="module")
def v6_ckpt(backend, tiny_cfg, tmp_path_factory):
    """A v6.0-style checkpoint file (pickled by torch.save, as YOLOv5 v6.x wrote it)."""
    torch.manual_seed(0)
    model = backend.yolo.Model(str(tiny_cfg), ch=3, nc=3)
    model.names, model.nc = ["circle", "rectangle", "triangle"], 3  # v6 files hold a list of names
    path = save_checkpoint(make_v6_model(model).eval(), tmp_path_factory.mktemp("v6") / "best.pt")
    raw = torch.load(path, weights_only=False)["model"]
    assert torch.is_tensor(raw.model[-1].anchor_grid) and not hasattr(raw.model[-1], "inplace")  # really v6-style
    return path, model.half().float().eval()


def test_load_checkpoint_repairs_what_attempt_load_repairs(backend, v6_ckpt):
    path, v7 = v6_ckpt
    model = load_checkpoint(path, backend)["model"].float().eval()
    det = model.model[-1]
    assert isinstance(det.anchor_grid, list) and len(det.anchor_grid) == det.nl and "anchor_grid" not in det._buffers
    assert det.inplace is True and model.names == {0: "circle", 1: "rectangle", 2: "triangle"}
    assert all(hasattr(m, "recompute_scale_factor") for m in model.modules() if isinstance(m, nn.Upsample))
    assert all(hasattr(m, "inplace") for m in model.modules() if isinstance(m, nn.SiLU))
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(model(x)[0], v7(x)[0], atol=1e-5)  # the v7 model it was made from, same outputs
    fused = backend.attempt_load(path, "cpu")  # YOLOv5's attempt_load (its own repair misses PyPI's classes) + ours
    assert torch.allclose(fused(x)[0], v7(x)[0], atol=1e-3)
    assert repair_compat(model) == 0  # idempotent


@pytest.mark.parametrize("method, structure", [("global", "unstructured"), ("lamp", "unstructured"),
                                               ("layerwise", "unstructured"), ("obs", "unstructured"),
                                               ("auto", "unstructured"), ("auto", "channel")])
def test_v6_checkpoint_prunes_and_matches_yolov5_val(backend, v6_ckpt, tiny_data, tmp_path, method, structure):
    from yolo_prune_plugin.api import prune

    src = tmp_path / "best.pt"
    src.write_bytes(v6_ckpt[0].read_bytes())
    (entry,) = prune(src, data=tiny_data, imgsz=64, batch_size=2, device="cpu", workers=0, amount=0.3,
                     method=method, structure=structure, report_dir=tmp_path)
    out = tmp_path / "best_pruned.pt"
    assert entry.output == str(out) and out.is_file()
    if structure == "channel":
        assert entry.channels["params_after"] < entry.channels["params_before"]
    else:
        assert abs(entry.sparsity_after["sparsity"] - 0.3) < 1e-3
        assert entry.method == ("obs" if method == "auto" else method)  # tiny_data: train and val disjoint
    with driving_yolov5(backend), no_nms_time_limit(backend):
        r = backend.val.run(data=str(tiny_data), weights=str(out), imgsz=64, batch_size=2, iou_thres=0.6,
                            device="cpu", workers=0, project=str(tmp_path / "val"), plots=False)[0]
    after = entry.metrics_after
    assert after["nms_time_limit"] == "lifted"
    assert [round(float(v), 6) for v in r[:4]] == [after[k] for k in ("P", "R", "mAP50", "mAP50-95")]


@pytest.mark.parametrize("target", ["prune_model", "evaluate_weights"])  # before any write / with the temp file open
def test_unexpected_error_is_one_line_naming_the_file_and_leaves_nothing(small_ckpt, tiny_data, monkeypatch, capsys,
                                                                       target):
    from yolo_prune_plugin import pipeline, stages
    from yolo_prune_plugin.cli import main

    def boom(*args, **kwargs):
        raise RuntimeError("The expanded size of the tensor (1) must match\nsecond line")

    monkeypatch.setattr(stages if target == "prune_model" else pipeline, target, boom)
    before = sorted(p.name for p in small_ckpt.parent.iterdir())
    rc = main(["prune", "--weights", str(small_ckpt), "--data", str(tiny_data), "--img", "64", "--amount", "0.3",
               "--method", "global", "--device", "cpu", "--workers", "0", "--batch-size", "2"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("yolo-prune:")]
    assert lines == [f"yolo-prune: error: {small_ckpt}: pruning failed (RuntimeError: The expanded size of the "
                     "tensor (1) must match); run with --verbose for the traceback"]
    assert sorted(p.name for p in small_ckpt.parent.iterdir()) == before  # no best_pruned.pt, no temporary file


def test_unexpected_error_outside_the_pipeline_is_one_line(small_ckpt, monkeypatch, capsys):
    from yolo_prune_plugin import api
    from yolo_prune_plugin.cli import main

    def boom(*args, **kwargs):
        raise RuntimeError("unforeseen\nsecond line")

    monkeypatch.setattr(api, "prune", boom)
    rc = main(["prune", "--weights", str(small_ckpt), "--amount", "0.3", "--method", "global", "--no-eval"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("yolo-prune: error: RuntimeError: unforeseen; run with --verbose for the "
                                             "traceback")



def test_v6_checkpoint_exports_and_benches(backend, v6_ckpt, tmp_path):
    """The other load paths: YOLOv5's export.run (its own attempt_load) and the bench's loader."""
    from yolo_prune_plugin.backend.export import export_and_verify
    from yolo_prune_plugin.tools.bench import bench_files

    src = tmp_path / "best.pt"
    src.write_bytes(v6_ckpt[0].read_bytes())
    [r] = export_and_verify(src, ["torchscript"], imgsz=64)
    assert r.ok, r.message
    [row] = bench_files([src], imgsz=64, runs=1, warmup=0, backends=["torch"])
    assert row["file"] == str(src)
