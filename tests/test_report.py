"""report.py: the before/after table says what was pruned how, and what "before" is."""

from __future__ import annotations

import pytest

from yolo_prune_plugin.report import ReportEntry, format_table

METRICS = {"P": 0.5, "R": 0.5, "mAP50": 0.5, "mAP50-95": 0.3}


def _entry(**kw) -> dict:
    base = dict(checkpoint="/runs/exp/weights/best.pt", output="/runs/exp/weights/best_pruned.pt", mode="oneshot",
                method="global", amount=0.3, device="cpu", imgsz=64, metrics_before=METRICS, metrics_after=METRICS)
    return ReportEntry(**{**base, **kw}).to_dict()


@pytest.mark.parametrize("kw,title", [
    ({}, "best.pt -> best_pruned.pt  (method=global, amount=0.3, mode=oneshot)"),
    ({"structure": "channel", "channels": {"importance": "taylor"}},
     "best.pt -> best_pruned.pt  (structure=channel, importance=taylor, amount=0.3, mode=oneshot)"),
    ({"structure": "channel", "channels": {"importance": "l1"}, "mode": "finetune"},
     "best.pt -> best_pruned.pt  (structure=channel, importance=l1, amount=0.3, mode=finetune)"),
])
def test_table_title_names_structure_and_importance(kw, title):
    assert format_table(_entry(**kw)).splitlines()[0] == title


@pytest.mark.parametrize("structure,channels,how", [("unstructured", None, "method=global"),
                                                     ("channel", {"importance": "l1"},
                                                      "structure=channel, importance=l1")])
def test_schedule_table_says_before_is_the_dense_model(structure, channels, how):
    src = "epoch 0 (dense, training history)"
    table = format_table(_entry(checkpoint="/runs/exp/weights/last.pt", mode="schedule", structure=structure,
                                channels=channels, metrics_before_source=src))
    lines = table.splitlines()
    assert lines[0] == f"dense model -> best_pruned.pt  ({how}, amount=0.3, mode=schedule)"
    assert "last.pt" not in table  # the schedule's source file is already pruned: never "before"
    assert f"(before: {src})" in lines
