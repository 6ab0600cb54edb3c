"""sweep.py: every (method, amount) point in one process; CSV/JSON/PNG outputs; no overwriting."""

from __future__ import annotations

import csv
import json

import pytest

from yolo_prune_plugin.errors import ConfigError
from yolo_prune_plugin.tools.sweep import CachedBatches, parse_points, run_sweep



@pytest.fixture(scope="module")
def swept(backend, coco8_yaml, shared, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "sw"
    lines: list[str] = []
    result = run_sweep(shared / "weights" / "yolov5n.pt", coco8_yaml, amounts="0.3,0.6", methods="global,lamp",
                       imgsz=96, batch_size=8, device="cpu", workers=0, out=out, echo=lines.append)
    return result, out, lines


def test_sweep_outputs(swept):
    result, out, lines = swept
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["method"], float(r["amount"])) for r in rows] == [("global", 0.3), ("global", 0.6), ("lamp", 0.3),
                                                                   ("lamp", 0.6)]
    for r in rows:
        assert abs(float(r["sparsity"]) - float(r["amount"])) < 1e-6
        assert 0 <= float(r["mAP50-95"]) <= float(r["mAP50"]) <= 1
    data = json.loads((out / "sweep.json").read_text())
    assert data["dense"]["mAP50-95"] > 0 and len(data["points"]) == 4
    assert data["layers_point"] == "global:0.6" and len(data["layers"]["global:0.6"]) == 60
    for png in ("sweep.png", "layers.png"):
        blob = (out / png).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 10_000
    # one progress line per point, plus the dense baseline and the summary
    assert sum(line.startswith("[") and "/4]" in line for line in lines) == 4 and lines[0].startswith("[dense]")


def test_sweep_never_overwrites(swept, backend, coco8_yaml, shared):
    result, out, _ = swept
    before = (out / "sweep.csv").read_bytes()
    again = run_sweep(shared / "weights" / "yolov5n.pt", coco8_yaml, amounts="0.3", methods="global", imgsz=96,
                      batch_size=8, device="cpu", workers=0, out=out, echo=lambda s: None)
    assert (out / "sweep.csv").read_bytes() == before
    assert again["outputs"]["csv"] == str(out.with_name(out.name + "2") / "sweep.csv")


def test_cached_batches_replay_fresh_targets():
    import torch

    t = torch.ones(2, 6)
    cached = CachedBatches([(torch.zeros(1), t, ["a"], [None])])
    first = next(iter(cached))[1]
    first *= 5  # val.run scales targets in place
    assert torch.equal(next(iter(cached))[1], torch.ones(2, 6)) and len(cached) == 1


@pytest.mark.parametrize("amounts,methods,match", [
    ("0.1,1.2", "global", "'sweep.amounts' must satisfy"),
    ("", "global", "at least one fraction"),
    ("0.1", "global,l0", "'sweep.methods' must be one of"),
    ("0.1,x", "global", "'sweep.amounts' must be a list of fractions"),
])
def test_bad_points(amounts, methods, match):
    with pytest.raises(ConfigError, match=match):
        parse_points(amounts, methods)
