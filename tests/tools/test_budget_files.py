"""tools/budget_files.py: the search's CSV and plot from a report section (no model)."""

from __future__ import annotations

import csv

import pytest

from yolo_prune_plugin.tools.budget import Budget, Point
from yolo_prune_plugin.tools.budget_files import write_budget_files


def _point(imgsz, amount, m, sp, meets, size=1.0):
    p = Point(amount, {"P": 0.5, "R": 0.5, "mAP50": 0.6, "mAP50-95": m}, latency_ms=10 / sp, speedup=sp, size=size,
              seconds=1.0, imgsz=imgsz, meets=meets, drop=round(0.4 - m, 6))
    return p.to_dict()


@pytest.mark.parametrize("joint", [True, False])
def test_csv_marks_the_chosen_point_and_the_png_is_drawn(tmp_path, joint):
    """With input sizes, the chosen row is the one with the chosen size *and* amount (the same amount at two
    sizes is two points); without, the amount alone."""
    if joint:
        trace = [_point(384, 0.0, 0.398, 1.16, False), _point(320, 0.0, 0.396, 1.64, True),
                 _point(352, 0.25, 0.37, 1.6, True, 0.7), _point(384, 0.25, 0.372, 1.4, False, 0.7)]
        chosen = trace[1]
    else:
        trace = [_point(None, 0.45, 0.3, 1.3, False, 0.55), _point(None, 0.6, 0.25, 1.55, True, 0.4)]
        chosen = trace[1]
    section = {"trace": trace, "chosen": chosen, "amount": chosen["amount"], "evaluations": len(trace),
               "seconds": 12.0, "budget": Budget(0.4, min_speedup=1.5).to_dict(),
               "dense_search": {"mAP50-95": 0.4}}
    paths = write_budget_files(section, tmp_path / "run", "best")
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [r["imgsz"] for r in rows] == [str(p["imgsz"] or "") for p in trace]
    assert [r["chosen"] for r in rows] == ["True" if p is chosen else "False" for p in trace]
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
