"""bench.py: latency of checkpoints side by side (ratios only: no timing thresholds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from yolo_prune_plugin.errors import CheckpointError, ConfigError
from yolo_prune_plugin.prune.channel import channel_prune
from yolo_prune_plugin.tools import bench
from yolo_prune_plugin.tools.bench import bench_files, format_bench_table

from testkit import save_checkpoint


@pytest.fixture
def pair(small_model, small_ckpt, tmp_path):
    channel_prune(small_model, 0.5, imgsz=320, log=False)
    return small_ckpt, save_checkpoint(small_model.eval(), tmp_path / "pruned.pt")


def test_channel_pruned_model_is_timed_and_smaller(pair, monkeypatch):
    """The work itself (GFLOPs, params, file sizes) is asserted; the timing arithmetic is fed known times (no
    timing threshold: measured ratios depend on the machine's load)."""
    dense, pruned = pair
    real = bench.time_side_by_side
    seen = {}

    def known_times(runners, runs, warmup, progress=False):
        real(runners, 1, 0)  # every runner really runs once: the models and the ONNX sessions work
        seen["runners"] = [sorted(fns) for fns in runners]
        seen["runs"] = runs
        return [{"torch": [9.0, 10.0, 11.0, 30.0], "onnxruntime": [4.0, 4.0, 5.0, 6.0]},
                {"torch": [4.0, 5.0, 6.0, 20.0], "onnxruntime": [1.0, 2.0, 2.0, 9.0]}]

    monkeypatch.setattr(bench, "time_side_by_side", known_times)
    rows = bench_files([dense, pruned], imgsz=320, batch=1, threads=1, runs=15, warmup=2, progress=False)
    assert seen == {"runners": [["onnxruntime", "torch"]] * 2, "runs": 15}
    d, p = rows
    # median and 90th percentile (numpy's linear interpolation) of the known times; speed-up = dense / pruned median
    assert (d["torch_median_ms"], d["torch_p90_ms"], p["torch_median_ms"], p["torch_p90_ms"]) == (10.5, 24.3, 5.5, 15.8)
    assert (p["onnxruntime_median_ms"], p["onnxruntime_p90_ms"]) == (2.0, 6.9)
    assert (d["torch_speedup"], p["torch_speedup"], p["onnxruntime_speedup"]) == (1.0, round(10.5 / 5.5, 3), 2.25)
    assert p["params"] < 0.6 * d["params"] and p["gflops"] < 0.6 * d["gflops"]
    assert p["pt_bytes"] < d["pt_bytes"] and p["onnx_bytes"] < 0.6 * d["onnx_bytes"]
    table = format_bench_table(rows)
    assert "best.pt" in table and "pruned.pt" in table and "ORT med ms" in table and "2.25x" in table
    assert not list(dense.parent.glob("*.onnx"))  # nothing written beside the weights


def test_side_by_side_warms_up_then_times_round_robin(monkeypatch):
    """Warm-up calls are untimed and come first; then one call of every runner per round; each time is the
    clock's difference around that call, in milliseconds."""
    now = [0.0]
    calls = []

    class Clock:
        @staticmethod
        def perf_counter():
            return now[0]

    def runner(name, seconds):
        def fn():
            calls.append(name)
            now[0] += seconds
        return fn

    monkeypatch.setattr(bench, "time", Clock)
    times = bench.time_side_by_side([{"torch": runner("a", 0.004)}, {"torch": runner("b", 0.001),
                                                                      "onnxruntime": runner("c", 0.002)}],
                                    runs=3, warmup=2)
    assert calls == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c"] * 3
    assert times == [{"torch": [pytest.approx(4.0)] * 3},
                     {"torch": [pytest.approx(1.0)] * 3, "onnxruntime": [pytest.approx(2.0)] * 3}]


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


@pytest.mark.parametrize("pruned_speedup, size, as_fast", [(1.3, 352, True), (1.5, 320, True), (2.5, 288, False)])
def test_resize_baseline_is_the_largest_lower_size_as_fast(monkeypatch, pruned_speedup, size, as_fast):
    """The dense model at 352 / 320 / 288 read 1.38x / 1.66x / 2.02x in the same run: the baseline of a pruned file
    at 1.3x is 352 (the largest as fast), at 1.5x 320; nothing is 2.5x fast, so the fastest (288) is named and
    marked not as fast. Only that size is evaluated."""
    seen = {}

    def fake_bench_files(files, imgsz, batch, runs, warmup, sizes):
        seen["sizes"] = sizes
        speed = {416: 1.0, 352: 1.38, 320: 1.66, 288: 2.02}
        rows = [{"onnxruntime_speedup": speed[s], "onnxruntime_median_ms": 10 / speed[s]} for s in sizes]
        rows[1] = {"onnxruntime_speedup": pruned_speedup, "onnxruntime_median_ms": 10 / pruned_speedup}
        return rows

    evaluated = []
    monkeypatch.setattr(bench, "bench_files", fake_bench_files)
    rows, rb = bench.bench_against_resizing(Path("dense.pt"), Path("pruned.pt"), 416, 416, [416, 352, 320, 288],
                                            lambda s: evaluated.append(s) or {"mAP50-95": 0.5}, runs=3, warmup=0)
    assert seen["sizes"] == [416, 416, 352, 320, 288] and len(rows) == 2
    assert (rb["imgsz"], rb["as_fast"], rb["pruned_speedup"]) == (size, as_fast, pruned_speedup) and evaluated == [size]
    text, worse = bench.describe_resize_baseline(rb, {"mAP50-95": 0.45})
    assert text.startswith(f"dense at --img {size}: ") and "mAP50-95 0.5000; pruned file" in text
    assert worse is as_fast  # as fast and more accurate than the pruned file: pruning did not earn its place
    assert bench.describe_resize_baseline(rb, {"mAP50-95": 0.55})[1] is False
