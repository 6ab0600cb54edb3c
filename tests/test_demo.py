"""`yolo-prune demo` ends with a short sweep of its own model and prints where sweep.png is."""

from __future__ import annotations

from pathlib import Path

from yolo_prune_plugin.demo import DEMO_SWEEP_AMOUNTS, demo_sweep
from yolo_prune_plugin.tools.synthetic import TINY, make_dataset

from testkit import save_checkpoint


def test_demo_sweep_writes_plot_and_prints_its_path(backend, small_model, tmp_path, caplog, one_thread):
    import logging

    caplog.set_level(logging.INFO, logger="yolo_prune_plugin")
    data = make_dataset(tmp_path / "data", **TINY.dataset_kwargs())
    (tmp_path / "exp" / "weights").mkdir(parents=True)
    ck = save_checkpoint(small_model, tmp_path / "exp" / "weights" / "best.pt")
    result = demo_sweep(ck, data, imgsz=64, device="cpu", out=tmp_path / "exp" / "sweep")
    png = Path(result["outputs"]["png"])
    assert png.is_file() and png.parent == tmp_path / "exp" / "sweep"
    assert [p["amount"] for p in result["points"]] == list(DEMO_SWEEP_AMOUNTS)
    assert f"plot: {png}" in caplog.text and "retention" in caplog.text
