"""bench.py: latency of checkpoints side by side (ratios only: no timing thresholds)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch_pruning")
pytest.importorskip("onnxruntime")

from yolo_prune_plugin.tools.bench import bench_files, format_bench_table  # noqa: E402
from yolo_prune_plugin.errors import CheckpointError, ConfigError  # noqa: E402
from yolo_prune_plugin.prune.channel import channel_prune  # noqa: E402

from testkit import save_checkpoint  # noqa: E402


@pytest.fixture
def pair(small_model, small_ckpt, tmp_path):
    channel_prune(small_model, 0.5, imgsz=320, log=False)
    return small_ckpt, save_checkpoint(small_model.eval(), tmp_path / "pruned.pt")


def test_channel_pruned_model_is_timed_and_smaller(pair):
    """Ratios of measured times depend on the machine's load: the work itself (GFLOPs, params) is asserted."""
    dense, pruned = pair
    rows = bench_files([dense, pruned], imgsz=320, batch=1, threads=1, runs=15, warmup=2, progress=False)
    d, p = rows
    assert d["torch_speedup"] == 1.0 and d["onnxruntime_speedup"] == 1.0
    for k in ("torch", "onnxruntime"):  # timed, and the speed-up is the ratio of the medians
        assert p[f"{k}_median_ms"] > 0 and p[f"{k}_speedup"] == pytest.approx(
            d[f"{k}_median_ms"] / p[f"{k}_median_ms"], rel=0.01)
    assert p["params"] < 0.6 * d["params"] and p["gflops"] < 0.6 * d["gflops"]
    assert p["pt_bytes"] < d["pt_bytes"] and p["onnx_bytes"] < 0.6 * d["onnx_bytes"]
    assert p["onnxruntime_p90_ms"] >= p["onnxruntime_median_ms"]
    table = format_bench_table(rows)
    assert "best.pt" in table and "pruned.pt" in table and "ORT med ms" in table
    assert not list(dense.parent.glob("*.onnx"))  # nothing written beside the weights


@pytest.mark.parametrize("kwargs,match", [({"runs": 0}, "runs"), ({"backends": ("tensorrt",)}, "tensorrt"),
                                          ({"threads": 0}, "threads"), ({"imgsz": 8}, "imgsz")])
def test_bad_arguments(small_ckpt, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        bench_files([small_ckpt], progress=False, **kwargs)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt: no such file"):
        bench_files([tmp_path / "nope.pt"], progress=False)


def test_cli_bench_prints_table(small_ckpt, capsys):
    from yolo_prune_plugin.cli import main

    assert main(["bench", "--weights", str(small_ckpt), "--img", "64", "--runs", "2", "--warmup", "0",
                 "--threads", "1", "--backends", "torch"]) == 0
    out = capsys.readouterr().out
    assert "best.pt" in out and "torch med ms" in out
