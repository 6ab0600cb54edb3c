"""backend/patches.py: the compat patches are undone; YOLOv5's output is muted where the plugin drives it for itself
(exports into temporary folders, budget probes), with its failures still reported."""

from __future__ import annotations

import logging
import shutil
import threading

import pytest
import torch

from yolo_prune_plugin.backend.patches import compat_active, compat_patches, muted_yolov5

#: What YOLOv5's export banner says; none of it may reach the user from an export the plugin makes.
BANNER = ("Export complete", "Results saved to", "Detect:", "Validate:", "PyTorch Hub:", "Visualize:", "netron")


def _patchable_state(backend):
    """What the compat patches touch: numpy's trapz, Pillow's getsize, check_font under both spellings, sys.path."""
    import sys

    import numpy as np
    from PIL import ImageFont

    fonts = {p: getattr(sys.modules.get(p + "utils.general"), "check_font", None) for p in ("", "yolov5.")}
    plots = {p: getattr(sys.modules.get(p + "utils.plots"), "check_font", None) for p in ("", "yolov5.")}
    return (getattr(np, "trapz", None), ImageFont.FreeTypeFont.__dict__.get("getsize"),
            ImageFont.ImageFont.__dict__.get("getsize"), fonts, plots, list(sys.path))


def test_compat_patches_apply_inside_and_are_undone(backend, monkeypatch):
    import numpy as np
    from PIL import ImageFont

    monkeypatch.delattr(np, "trapz", raising=False)  # as on numpy >= 2.4
    before = _patchable_state(backend)
    with compat_patches(backend):
        with compat_patches(backend):  # nested: one application
            assert compat_active()
            font = ImageFont.load_default()
            w, h = font.getsize("abc")  # Pillow >= 10 removed it; YOLOv5's plots call it
            assert w > 0 and h > 0
            assert np.trapz([1.0, 1.0], [0.0, 2.0]) == 2.0
            backend.general.check_font("NoSuchFont-for-test.ttf")  # offline download failure is not fatal
        assert compat_active()
    assert not compat_active()
    assert _patchable_state(backend) == before


def test_compat_patches_undone_when_block_raises(backend):
    before = _patchable_state(backend)
    with pytest.raises(RuntimeError, match="boom"):
        with compat_patches(backend):
            raise RuntimeError("boom")
    assert not compat_active() and _patchable_state(backend) == before


# ------------------------------------------------------------------------------------------- quiet exports
@pytest.fixture
def shown(backend, caplog, capsys):
    """Everything a user would see: YOLOv5's logger (it does not propagate: caplog's handler is added to it), the
    plugin's logger, stdout and stderr. Call it to read (and clear) what was shown so far."""
    yolo_logger = logging.getLogger(backend.general.LOGGING_NAME)
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger=backend.general.LOGGING_NAME)
    yolo_logger.addHandler(caplog.handler)

    def read() -> str:
        text = caplog.text + "".join(capsys.readouterr())
        caplog.clear()
        return text

    try:
        yield read
    finally:
        yolo_logger.removeHandler(caplog.handler)


def _yolov5_state(backend):
    import sys

    dataloaders = sys.modules[backend.prefix + "utils.dataloaders"]
    return list(logging.getLogger(backend.general.LOGGING_NAME).filters), backend.val.tqdm, dataloaders.tqdm


def test_yolov5_export_run_prints_its_banner(backend, small_ckpt, tmp_path, shown):
    """The control: YOLOv5's own ``export.run`` called directly shows the banner naming its files (so the quiet
    tests below can fail)."""
    from yolo_prune_plugin.backend.calls import export_run

    src = tmp_path / "direct" / "best.pt"
    src.parent.mkdir()
    shutil.copyfile(small_ckpt, src)
    export_run(backend, weights=str(src), imgsz=[64, 64], device="cpu", include=("torchscript",))
    text = shown()
    assert src.with_suffix(".torchscript").is_file()
    for line in ("Export complete", "Visualize:", "netron", str(src.parent)):
        assert line in text


def test_plugin_export_is_quiet_and_names_the_final_file(backend, small_ckpt, shown):
    from yolo_prune_plugin.backend.export import export_and_verify

    before = _yolov5_state(backend)
    [r] = export_and_verify(small_ckpt, ["onnx"], imgsz=64)
    text = shown()
    assert r.ok and r.written
    for line in BANNER + ("Fusing layers", "-export-"):  # "-export-": the hidden temporary folder's name
        assert line not in text, text
    final = small_ckpt.with_suffix(".onnx")
    assert final.is_file() and sorted(p.name for p in small_ckpt.parent.iterdir()) == ["best.onnx", "best.pt"]
    [exported] = [ln for ln in text.splitlines() if "Exported" in ln]  # one line, the final path, the check
    assert f"Exported {final} (" in exported and "verified:" in exported and "max |diff|" in exported
    assert _yolov5_state(backend) == before  # the filter and the val.tqdm wrapper are gone again


def test_failed_plugin_export_reports_yolov5s_reason(backend, small_ckpt, monkeypatch, shown):
    from yolo_prune_plugin.backend.export import export_and_verify

    def boom(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(torch.onnx, "export", boom)  # inside YOLOv5's try_export: it only logs the failure
    [r] = export_and_verify(small_ckpt, ["onnx"], imgsz=64)
    text = shown()
    assert not r.ok and not r.written
    assert "ONNX: export failure" in r.message and "exporter exploded" in r.message  # YOLOv5's own line, collected
    assert "Exported" not in text and not any(line in text for line in BANNER)
    assert not small_ckpt.with_suffix(".onnx").exists()


def test_bench_and_probe_export_is_quiet(backend, small_ckpt, tmp_path, shown):
    """tools/bench.py's runner (``yolo-prune bench``, ``--prune-bench`` and every budget probe use it)."""
    from yolo_prune_plugin.tools.bench import bench_input, make_runner

    row, fns = make_runner(small_ckpt, tmp_path / "onnx", bench_input(1, 64), ["onnxruntime"],
                           torch.device("cpu"), 1, backend)
    fns["onnxruntime"]()
    text = shown()
    assert row["onnx_bytes"] > 0
    for line in BANNER + ("Fusing layers", str(tmp_path / "onnx")):
        assert line not in text, text


def test_bench_export_failure_names_yolov5s_reason(backend, small_ckpt, tmp_path, monkeypatch, shown):
    from yolo_prune_plugin.errors import ExportError
    from yolo_prune_plugin.tools.bench import bench_input, make_runner

    def boom(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(torch.onnx, "export", boom)
    with pytest.raises(ExportError, match="ONNX export failed .*export failure.*exporter exploded"):
        make_runner(small_ckpt, tmp_path / "onnx", bench_input(1, 64), ["onnxruntime"], torch.device("cpu"), 1,
                    backend)
    assert not any(line in shown() for line in BANNER)


def test_muted_yolov5_hides_this_threads_info_only_and_collects_problems(backend, shown):
    log = logging.getLogger(backend.general.LOGGING_NAME)
    before = _yolov5_state(backend)
    with muted_yolov5(backend) as outer:
        with muted_yolov5(backend) as inner:  # nested: both blocks collect
            log.info("info line inside")
            log.info("\x1b[34mONNX:\x1b[0m export failure: no luck")
            log.warning("WARNING a warning inside")
            other = threading.Thread(target=log.info, args=("info line of another thread",))
            other.start()
            other.join()
        log.info("info line of the outer block")
    log.info("info line after")
    text = shown()
    assert "info line inside" not in text and "export failure" not in text and "outer block" not in text
    assert "WARNING a warning inside" in text  # warnings and errors are still shown
    assert "info line of another thread" in text and "info line after" in text
    assert inner == outer == ["ONNX: export failure: no luck", "WARNING a warning inside"]
    assert _yolov5_state(backend) == before


def test_muted_yolov5_hides_validation_progress(backend, small_model, tiny_data, shown):
    """A budget probe's evaluation: YOLOv5's label scan, val progress bar and result line are shown unmuted, and
    hidden muted."""
    from yolo_prune_plugin.backend.evaluation import evaluate, make_settings

    settings = make_settings(tiny_data, 64, 2, "cpu", workers=0)
    evaluate(small_model, settings)
    loud = shown()
    before = _yolov5_state(backend)
    with muted_yolov5(backend):
        m = evaluate(small_model, settings)
    quiet = shown()
    assert "Scanning" in loud and "Images" in loud and " all " in loud  # the control
    assert "Scanning" not in quiet and "Images" not in quiet and " all " not in quiet and m.map >= 0
    assert _yolov5_state(backend) == before
