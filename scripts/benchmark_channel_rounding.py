#!/usr/bin/env python
"""Benchmark (issue 25): does ONNX Runtime CPU reward channel counts that are multiples of 8 or 16?

    flock /tmp/bench.lock python scripts/benchmark_channel_rounding.py [--threads 1]

Times one convolution + SiLU (the graph ``channel.allocation: latency`` times, prune/latency.py) at layer shapes
of yolov5n at 416 px, for every output (and input) channel count from 40 to 72, and prints the median latency
and, per residue modulo 8, the mean latency relative to a straight line through all counts: a count that the
runtime rewards sits below the line. Not a test: numbers depend on the machine (its load is printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (name, other channels, kernel, stride, input size): layers of yolov5n at 416 px
SHAPES = [("3x3 s1 at 52x52", 64, 3, 1, 52), ("1x1 at 52x52", 64, 1, 1, 52), ("3x3 s2 at 104x104", 32, 3, 2, 104),
          ("1x1 at 26x26", 128, 1, 1, 26)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from yolo_prune_plugin.prune import latency

    latency.RUNS = 15
    counts = list(range(40, 73))
    load = os.getloadavg()
    print(f"ONNX Runtime CPU, {args.threads} thread(s), median of {latency.RUNS} runs x {args.repeats}; "
          f"load {load[0]:.2f} before")
    for which in ("out", "in"):
        for name, other, k, s, hw in SHAPES:
            ms = {}
            for c in counts:
                cin, cout = (other, c) if which == "out" else (c, other)
                ms[c] = statistics.median(latency.time_conv(cin, cout, k, s, k // 2, (hw, hw), args.threads)
                                          for _ in range(args.repeats))
            n = len(counts)
            mx, my = sum(counts) / n, sum(ms.values()) / n
            slope = sum((c - mx) * (ms[c] - my) for c in counts) / sum((c - mx) ** 2 for c in counts)
            resid = {c: ms[c] / (my + slope * (c - mx)) - 1 for c in counts}
            by_mod = {r: statistics.mean(v for c, v in resid.items() if c % 8 == r) for r in range(8)}
            m16 = statistics.mean(v for c, v in resid.items() if c % 16 == 0)
            residues = ", ".join(f"mod8={r}: {100 * v:+.1f}%" for r, v in by_mod.items())
            print(f"{which}-channels, {name}: {ms[40]:.3f} ms at 40 .. {ms[72]:.3f} ms at 72; relative to the line: "
                  f"{residues}; multiples of 16: {100 * m16:+.1f}%")
    print(f"load {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
