#!/usr/bin/env python
"""Plot the retention-vs-epochs curve from ``scripts/benchmark_recovery.py`` results.

    python scripts/plot_recovery.py /tmp/b26_curve_s0/benchmark_recovery.json /tmp/b26_curve_s1/... \\
        --title "corn-pest yolov5n, channel 50 %, test split @ 416" --out docs/recovery_curve.png

Every row of every file is one point: x = fine-tune epochs (0 = the one-shot file), y = mAP50-95 of the written
file / mAP50-95 of the dense file (each file's own ``dense`` row). Rows are grouped by their spec without the epoch
count (e.g. ``channel:0.5`` and ``channel:0.5:reg``); each file is a seed (its points are drawn, the line is the
mean per epoch count). ``--table`` also prints the points as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def points(files: list[Path]) -> dict[str, dict[int, list[float]]]:
    """``{group: {epochs: [retention per file]}}``; a group's one-shot value is its point at 0 epochs."""
    out: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for f in files:
        d = json.loads(f.read_text())
        dense = next(r for r in d["rows"] if r["model"] == "dense")["mAP50-95"]
        oneshot: dict[str, float] = {}
        for r in d["rows"]:
            m = re.match(r"(.+?) \+ (\d+) ep FT(.*)", r["model"])
            if not m:
                continue
            group = (m.group(1) + m.group(3)).strip()
            out[group][int(m.group(2))].append(r["mAP50-95"] / dense)
            if r.get("oneshot_mAP50-95") is not None:
                oneshot[group] = r["oneshot_mAP50-95"] / dense
        for group, v in oneshot.items():
            out[group][0].append(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="benchmark_recovery.json files (one per seed)")
    ap.add_argument("--out", type=Path, default=Path("recovery_curve.png"))
    ap.add_argument("--title", default="")
    ap.add_argument("--table", action="store_true", help="also print a Markdown table of the points")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = points(args.files)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for group, by_epochs in sorted(data.items()):
        xs = sorted(by_epochs)
        means = [statistics.mean(by_epochs[x]) for x in xs]
        line, = ax.plot(xs, means, marker="o", label=group)
        for x in xs:
            ax.scatter([x] * len(by_epochs[x]), by_epochs[x], color=line.get_color(), s=12, alpha=0.5)
    ax.set_xlabel("fine-tune epochs (0 = one-shot)")
    ax.set_ylabel("mAP50-95 / dense file's")
    ax.set_title(args.title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    if args.table:
        epochs = sorted({x for v in data.values() for x in v})
        print("| row | " + " | ".join(f"{x} ep" for x in epochs) + " |")
        print("|---|" + "---|" * len(epochs))
        for group, by_epochs in sorted(data.items()):
            cells = [" / ".join(f"{v:.3f}" for v in by_epochs[x]) if x in by_epochs else "—" for x in epochs]
            print(f"| {group} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
