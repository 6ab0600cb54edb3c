"""Prune to a budget: a monotone search on ``amount`` that finds the largest (or smallest) one meeting the limits.

Pure functions: the search takes ``evaluate(amount) -> Point`` and knows nothing of YOLOv5. Accuracy falls and
speed-up grows with ``amount``, so each limit splits ``[0, max_amount]`` at one boundary:

* with ``max_drop`` the answer is the **largest** amount whose drop is within the limit (and which meets the
  speed/size limits too): the most compressed model the accuracy budget allows;
* with only ``min_speedup``/``max_size`` it is the **smallest** amount that meets them: the most accurate model
  that is fast or small enough.

The bracket ``[ok side, failing side]`` is narrowed by interpolation on the measured margin (the drop, or the
speed-up/size ratio) with a bisection step whenever interpolation stalls, until it is ``tolerance`` wide or
``max_evals`` prunes were evaluated. The returned point is always one that was measured to meet every limit
(taken from the trace), so an evaluator that is not monotone can mislead the search but never makes it return
a point outside the budget; when no point meets it the result has ``chosen=None`` and the ``closest`` point.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

METRIC_KEYS = ("P", "R", "mAP50", "mAP50-95")


@dataclass
class Point:
    """One evaluated one-shot prune."""

    amount: float
    metrics: dict  # P, R, mAP50, mAP50-95 on the search images
    latency_ms: Optional[float] = None  # median on the budget's runtime
    speedup: Optional[float] = None  # dense latency / this latency (measured side by side)
    size: Optional[float] = None  # params (or .onnx bytes) ratio to dense
    params: Optional[int] = None  # parameters of the pruned model (unstructured: unchanged, zeros count)
    seconds: float = 0.0  # prune + evaluation + timing of this point
    drop: Optional[float] = None  # mAP50-95 drop from the dense model (set by the search)
    meets: Optional[bool] = None  # every limit met (set by the search)
    error: Optional[str] = None  # the prune failed at this amount (e.g. channels cannot be removed so far)
    imgsz: Optional[int] = None  # input size it was evaluated and timed at (None: the evaluation size)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Budget:
    """The limits, with ``max_drop`` already absolute (mAP50-95 points) against ``dense_map``."""

    dense_map: float
    max_drop: Optional[float] = None
    min_speedup: Optional[float] = None
    max_size: Optional[float] = None

    @classmethod
    def from_target(cls, target: object, dense_map: float) -> "Budget":
        """From a :class:`~yolo_prune_plugin.config.TargetOptions` (``relative``: a fraction of ``dense_map``)."""
        drop = getattr(target, "max_drop")
        if drop is not None and getattr(target, "relative", False):
            drop = drop * dense_map
        return cls(dense_map, drop, getattr(target, "min_speedup"), getattr(target, "max_size"))

    @property
    def maximise(self) -> bool:
        """True: the largest amount within the limits (an accuracy limit is set); False: the smallest."""
        return self.max_drop is not None

    def drop(self, p: Point) -> float:
        return math.inf if p.error else self.dense_map - float(p.metrics["mAP50-95"])

    def accuracy_ok(self, p: Point) -> bool:
        return not p.error and (self.max_drop is None or self.drop(p) <= self.max_drop + 1e-9)

    def compression_ok(self, p: Point) -> bool:
        if p.error:
            return False
        fast = self.min_speedup is None or (p.speedup is not None and p.speedup >= self.min_speedup)
        small = self.max_size is None or (p.size is not None and p.size <= self.max_size)
        return fast and small

    def meets(self, p: Point) -> bool:
        return self.accuracy_ok(p) and self.compression_ok(p)

    def violation(self, p: Point) -> float:
        """How far ``p`` is outside the budget, each limit as a fraction of itself, summed (0: within)."""
        v = 0.0
        if self.max_drop is not None:
            v += max(0.0, self.drop(p) - self.max_drop) / max(self.max_drop, 1e-3)
        if self.min_speedup is not None:
            v += max(0.0, self.min_speedup - (p.speedup or 0.0)) / self.min_speedup
        if self.max_size is not None:
            v += max(0.0, (p.size if p.size is not None else 1.0) - self.max_size) / self.max_size
        return v

    def margin(self, p: Point) -> float:
        """The binding limit's signed margin: >= 0 on the side the search keeps (accuracy: low amounts;
        compression: high amounts), roughly linear in ``amount`` for interpolation."""
        if self.maximise:
            return (self.max_drop - self.drop(p)) / max(self.max_drop, 1e-3)
        m = math.inf
        if self.min_speedup is not None:
            m = min(m, (p.speedup or 0.0) / self.min_speedup - 1.0)
        if self.max_size is not None:
            m = min(m, 1.0 - (p.size if p.size is not None else 1.0) / self.max_size)
        return m

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchResult:
    chosen: Optional[Point]  # None: no evaluated point meets the budget
    closest: Optional[Point]  # the chosen point, else the one nearest to the budget
    trace: list = field(default_factory=list)  # every evaluated Point, in order
    reason: str = ""  # why the search stopped

    @property
    def evaluations(self) -> int:
        return len(self.trace)


def dense_point(budget: Budget) -> Point:
    """The unpruned model as amount 0 (drop 0, speed-up 1, size 1): the search's free first bracket end."""
    return Point(0.0, {"mAP50-95": budget.dense_map}, speedup=1.0, size=1.0, drop=0.0)


def _interpolate(lo: float, hi: float, m_lo: float, m_hi: float) -> float:
    """Where the straight line through ``(lo, m_lo)`` and ``(hi, m_hi)`` crosses zero (``m_lo >= 0 > m_hi``)."""
    return lo + (hi - lo) * m_lo / (m_lo - m_hi)


def next_amount(ok: tuple[float, Optional[float]], bad: tuple[float, Optional[float]], tolerance: float,
                bisect: bool) -> float:
    """The next probe inside the bracket: ``ok``/``bad`` are ``(amount, margin)`` of the nearest measured points
    on each side (``bad`` margin None: that end was not measured). Interpolation, kept at least ``tolerance/2``
    and a fifth of the bracket from its ends; the midpoint when ``bisect`` or nothing to interpolate."""
    (a, ma), (b, mb) = ok, bad
    lo, hi = min(a, b), max(a, b)
    mid = (lo + hi) / 2
    if bisect or mb is None or ma is None or ma - mb <= 0:
        return mid
    x = _interpolate(a, b, ma, mb)
    edge = max(tolerance / 2, (hi - lo) / 5)
    return min(max(x, lo + edge), hi - edge)


def search(evaluate: Callable[[float], Point], budget: Budget, *, max_amount: float = 0.9, tolerance: float = 0.02,
           max_evals: int = 6, on_point: Optional[Callable[[Point], None]] = None,
           start: Optional[Point] = None) -> SearchResult:
    """Find the amount the budget asks for with at most ``max_evals`` calls of ``evaluate``.

    The bracket starts at ``start`` (amount 0, already measured; default the dense model) and ``max_amount``
    (not measured until probed); each probe moves one end. It stops when the bracket is ``tolerance`` wide, after
    ``max_evals`` probes, or when a point fails both an accuracy and a compression limit (then no amount can meet
    the budget if the model is monotone). ``on_point`` is called after every evaluation (progress, keeping the
    model).
    """
    trace: list[Point] = []
    d = start or dense_point(budget)
    # ok end: the side the search keeps (maximise: low amounts pass accuracy; minimise: high amounts pass)
    ok: tuple[float, Optional[float]]
    bad: tuple[float, Optional[float]]
    if budget.maximise:  # (amount, margin); margin None: not measured yet
        ok, bad = (0.0, budget.margin(d)), (max_amount, None)
    else:
        ok, bad = (max_amount, None), (0.0, budget.margin(d))
    reason, moved = f"max_evals ({max_evals}) reached", []
    seen: set[float] = set()
    while len(trace) < max_evals:
        if abs(ok[0] - bad[0]) <= tolerance:
            reason = f"bracket within tolerance ({tolerance})"
            break
        stalled = len(moved) >= 2 and moved[-1] == moved[-2]
        x = round(next_amount(ok, bad, tolerance, stalled), 4)
        if x in seen:
            reason = "no new amount to probe"
            break
        seen.add(x)
        p = evaluate(x)
        p.drop = None if p.error else round(budget.drop(p), 6)
        p.meets = budget.meets(p)
        trace.append(p)
        if on_point is not None:
            on_point(p)
        if p.error:  # amounts from x up are out of reach: x becomes the top of the range
            ok, bad = (ok, (x, None)) if budget.maximise else ((x, None), bad)
            moved.append(not budget.maximise)
            continue
        keep = budget.accuracy_ok(p) if budget.maximise else budget.compression_ok(p)
        if budget.max_drop is not None and not budget.accuracy_ok(p) and not budget.compression_ok(p):
            reason = f"amount {x} fails both the accuracy and the speed/size limits"
            break
        if keep:
            ok = (x, budget.margin(p))
        else:
            bad = (x, budget.margin(p))
        moved.append(keep)
    return SearchResult(*pick(trace, budget), trace=trace, reason=reason)


def auto_sizes(imgsz: int, stride: int, low: float = 0.6) -> list[int]:
    """``target.imgsz: auto``: the multiples of ``stride`` from ``imgsz`` down to about ``low`` of it (largest
    first); ``imgsz`` itself is rounded down to a multiple of ``stride``."""
    top = imgsz // stride * stride
    bottom = max(stride, round(imgsz * low / stride) * stride)
    return list(range(top, bottom - 1, -stride)) or [top]


@dataclass
class JointResult(SearchResult):
    """:func:`joint_search`'s result: also the best resize-only point at least as fast as the chosen one."""

    resize_baseline: Optional[Point] = None
    sizes: list = field(default_factory=list)  # the input sizes searched (largest first)
    joint_sizes: list = field(default_factory=list)  # the sizes at which amounts were searched


def joint_search(evaluate: Callable[[int, float], Point], budget: Budget, sizes: list[int], base: int, *,
                 max_amount: float = 0.9, tolerance: float = 0.02, max_evals: int = 6, joint: int = 2,
                 on_point: Optional[Callable[[Point], None]] = None) -> JointResult:
    """Search (input size, amount) for the most accurate point that meets every limit of ``budget`` (which must
    set ``min_speedup`` or ``max_size``: a budget on accuracy alone is met best by the dense model).

    First every size is measured unpruned (``evaluate(s, 0.0)``; ``base`` is the dense model, free): resize-only
    points, the baseline every user has with ``--img``. Then, at the ``joint`` sizes where resizing alone is
    closest to the speed limit without meeting it (the least pruning needed; ``base`` among them when nothing
    else is), the amount search of :func:`search` finds the smallest amount meeting the speed/size limits
    (``max_evals`` prunes shared between those sizes). The chosen point is the most accurate measured one that
    meets every limit (resize-only points included); ``resize_baseline`` is the most accurate resize-only point at
    least as fast as the chosen one.
    """
    if budget.min_speedup is None and budget.max_size is None:
        raise ValueError("joint_search needs min_speedup or max_size")
    trace: list[Point] = []

    def measured(p: Point) -> Point:  # judged on the whole budget (the amount search sees speed/size only)
        p.drop = None if p.error else round(budget.drop(p), 6)
        p.meets = budget.meets(p)
        trace.append(p)
        if on_point is not None:
            on_point(p)
        return p

    dense = dense_point(budget)
    dense.imgsz, dense.meets = base, budget.meets(dense)
    resized = {base: dense}
    for s in sizes:
        if s != base:
            resized[s] = measured(evaluate(s, 0.0))
    compress = Budget(budget.dense_map, None, budget.min_speedup, budget.max_size)  # amounts: speed/size only
    short = sorted((s for s, p in resized.items() if not p.error and not compress.compression_ok(p)),
                   key=lambda s: -(resized[s].speedup or 0.0))
    chosen_sizes = short[:joint]
    per = [max_evals // len(chosen_sizes) + (i < max_evals % len(chosen_sizes)) for i in range(len(chosen_sizes))] \
        if chosen_sizes else []
    reasons = []
    for s, n in zip(chosen_sizes, per):
        if n < 1:
            continue
        r = search(lambda a, s=s: evaluate(s, a), compress, max_amount=max_amount, tolerance=tolerance, max_evals=n,
                   on_point=measured, start=resized[s])
        reasons.append(f"{s}px: {r.reason}")
    chosen, closest = pick_most_accurate(trace + ([dense] if dense.meets else []), budget)
    ref = chosen or closest
    baseline = None
    if ref is not None:
        fast = [p for p in resized.values() if not p.error and (p.speedup or 0.0) >= (ref.speedup or 0.0) - 1e-9]
        baseline = max(fast, key=lambda p: p.metrics["mAP50-95"]) if fast else None
    reason = "; ".join(reasons) or "resizing alone meets the budget at every size searched or none was left"
    return JointResult(chosen, closest, trace=trace, reason=reason, resize_baseline=baseline, sizes=list(sizes),
                       joint_sizes=chosen_sizes)


def pick_most_accurate(trace: list[Point], budget: Budget) -> tuple[Optional[Point], Optional[Point]]:
    """``(chosen, closest)`` of a joint search: the most accurate point within the budget (the faster, then the
    less pruned on ties); else None and the measured point with the least violation."""
    good = [p for p in trace if budget.meets(p)]
    if good:
        best = max(good, key=lambda p: (p.metrics["mAP50-95"], p.speedup or 0.0, -p.amount))
        return best, best
    pool = [p for p in trace if not p.error]
    return None, (min(pool, key=lambda p: (budget.violation(p), p.amount)) if pool else None)


def pick(trace: list[Point], budget: Budget) -> tuple[Optional[Point], Optional[Point]]:
    """``(chosen, closest)`` from the measured points: the largest amount within the budget (with ``max_drop``)
    or the most accurate one (smallest amount on ties); else None and the point with the least violation."""
    good = [p for p in trace if budget.meets(p)]
    if good:
        if budget.maximise:
            best = max(good, key=lambda p: (p.amount, p.metrics["mAP50-95"]))
        else:
            best = max(good, key=lambda p: (p.metrics["mAP50-95"], -p.amount))
        return best, best
    measured = [p for p in trace if not p.error]
    if not measured:
        return None, None
    return None, min(measured, key=lambda p: (budget.violation(p), p.amount))


def describe(p: Point, budget: Budget) -> str:
    """``amount 0.42: mAP50-95 0.301 (drop 0.012), 1.38x, params 0.61`` (what was measured)."""
    at = f"--img {p.imgsz}, " if p.imgsz is not None else ""
    parts = [f"{at}amount {p.amount:.3f}: mAP50-95 {p.metrics['mAP50-95']:.4f} (drop {budget.drop(p):+.4f})"]
    if p.speedup is not None:
        parts.append(f"{p.speedup:.2f}x")
    if p.size is not None:
        parts.append(f"size {p.size:.2f}")
    return ", ".join(parts)


def limits_text(budget: Budget) -> str:
    """The budget in words: ``drop <= 0.010, speed-up >= 1.50x``."""
    out = []
    if budget.max_drop is not None:
        out.append(f"mAP50-95 drop <= {budget.max_drop:.4f}")
    if budget.min_speedup is not None:
        out.append(f"speed-up >= {budget.min_speedup:.2f}x")
    if budget.max_size is not None:
        out.append(f"size <= {budget.max_size:.2f}")
    return ", ".join(out)


def format_trace(result: SearchResult, budget: Budget) -> str:
    """A fixed-width table of every evaluated point (evaluation order), the chosen one marked with ``*``."""
    sized = any(p.imgsz is not None for p in result.trace)
    img_head = f"{'img':>5}" if sized else ""
    head = (f"{'':2}{img_head}{'amount':>7}{'P':>8}{'R':>8}"
            f"{'mAP50':>8}{'mAP50-95':>10}{'drop':>9}{'ms':>9}{'speed-up':>10}{'size':>7}{'s':>7}  meets")
    lines = [head, "-" * len(head)]
    for p in result.trace:
        img = f"{p.imgsz if p.imgsz is not None else '':>5}" if sized else ""
        if p.error:
            lines.append(f"{'':2}{img}{p.amount:>7.3f}  not pruned: {p.error}")
            continue
        m = p.metrics
        mark = "*" if p is result.chosen else ""
        lat = f"{p.latency_ms:.1f}" if p.latency_ms is not None else "-"
        sp = f"{p.speedup:.2f}x" if p.speedup is not None else "-"
        sz = f"{p.size:.2f}" if p.size is not None else "-"
        lines.append(f"{mark:2}{img}{p.amount:>7.3f}{m.get('P', 0):>8.3f}{m.get('R', 0):>8.3f}{m.get('mAP50', 0):>8.3f}"
                     f"{m['mAP50-95']:>10.4f}{budget.drop(p):>+9.4f}{lat:>9}{sp:>10}{sz:>7}{p.seconds:>7.1f}  "
                     f"{'yes' if p.meets else 'no'}")
    lines.append(f"(dense mAP50-95 {budget.dense_map:.4f}; budget: {limits_text(budget)}; {result.reason})")
    return "\n".join(lines)


def frontier(section: dict) -> list[dict]:
    """The accuracy-speed frontier of a budget report section (``target``): every timed point as ``{"what",
    "imgsz", "amount", "speedup", "retention", "frontier", "chosen"}`` sorted by speed-up, the dense model first;
    ``frontier``: no other point is at least as fast and more accurate (retention of the search's dense mAP50-95)."""
    dense = section["dense_search"]["mAP50-95"]
    base = (section.get("imgsz") or {}).get("evaluation")
    c = section["chosen"]
    rows = [{"what": "dense" + (f", --img {base}" if base else ""), "imgsz": base, "amount": 0.0, "speedup": 1.0,
             "retention": 1.0, "chosen": False}]
    for p in section["trace"]:
        if p.get("error") or p.get("speedup") is None:
            continue
        at = p.get("imgsz")
        if p["amount"] == 0:
            what = f"dense, --img {at}"
        else:
            what = f"channel {p['amount']:.0%}" + (f" at --img {at}" if at is not None and at != base else "")
        rows.append({"what": what, "imgsz": at, "amount": p["amount"], "speedup": p["speedup"],
                     "retention": p["metrics"]["mAP50-95"] / dense if dense > 0 else 0.0,
                     "chosen": p["amount"] == c["amount"] and at == c.get("imgsz")})
    rows.sort(key=lambda r: (r["speedup"], r["retention"]))
    for r in rows:
        r["frontier"] = not any(o is not r and o["speedup"] >= r["speedup"] and o["retention"] > r["retention"]
                                for o in rows)
    return rows


def frontier_text(section: dict) -> str:
    """:func:`frontier` as a table: speed-up, retention, what; ``*`` on the frontier, ``<- chosen``."""
    lines = ["  speed-up  retention  point"]
    for r in frontier(section):
        mark = "*" if r["frontier"] else " "
        lines.append(f"{mark} {r['speedup']:>7.2f}x  {r['retention']:>9.3f}  {r['what']}"
                     f"{'  <- chosen' if r['chosen'] else ''}")
    return "\n".join(lines)


__all__ = ["Point", "Budget", "frontier", "frontier_text", "SearchResult", "JointResult", "search", "joint_search", "auto_sizes", "pick", "pick_most_accurate",
           "next_amount", "dense_point", "describe", "format_trace", "limits_text"]
