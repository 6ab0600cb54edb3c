"""The report: one entry type for every mode, ``prune_report.json``, the before/after table, atomic writes."""

from __future__ import annotations

import logging
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

LOGGER = logging.getLogger("yolo_prune_plugin")


# --------------------------------------------------------------------------------------------------
# the report entry: one type for one-shot, fine-tune and schedule
# --------------------------------------------------------------------------------------------------
MODES = ("oneshot", "finetune", "schedule")


#: below this fraction of the dense mAP50-95 the table points to fine-tuning
LOW_RETENTION = 0.9


@dataclass
class ReportEntry:
    """What happened to one checkpoint; stored in ``prune_report.json`` and under the pruned file's ``prune`` key."""

    checkpoint: str  # the source file
    output: str  # the pruned file
    mode: str  # oneshot | finetune | schedule
    method: str
    amount: float  # target fraction of Conv2d weights in scope set to zero
    device: str
    imgsz: int
    prune_seconds: Optional[float] = None  # None when the schedule pruned during training
    sparsity_before: Optional[dict] = None  # SparsityStats.to_dict of the source (None: resumed schedule run)
    sparsity_after: Optional[dict] = None  # of the written file, per layer
    sparsity_all_conv: Optional[dict] = None  # of the written file, every Conv2d (scope ignored)
    metrics_before: Optional[dict] = None  # P, R, mAP50, mAP50-95 of the source
    metrics_before_source: Optional[str] = None  # where metrics_before come from
    metrics_oneshot: Optional[dict] = None  # fine-tune mode: the one-shot pruned model before fine-tuning
    metrics_after: Optional[dict] = None  # the written file
    eval: Optional[dict] = None  # settings of the plugin's own validation
    method_details: dict = field(default_factory=dict)  # what the method reports (obs: calibration, errors)
    exports: list = field(default_factory=list)  # ArtifactReport.to_dict per exported format
    finetune: Optional[dict] = None  # fine-tune mode: run, epochs, lr, history
    schedule: Optional[dict] = None  # schedule mode: steps, source epoch, expected zeros
    leaks: Optional[dict] = None  # recovery modes: non-zero values at pruned positions (always 0)
    structure: str = "unstructured"  # unstructured | channel
    channels: Optional[dict] = None  # channel mode: params, GFLOPs, Conv2d weights, channel counts before/after
    recalibration: Optional[dict] = None  # BatchNorm recalibration: layers, images, seconds
    bench: Optional[list] = None  # bench: true: latency rows of the source and the pruned file (bench.bench_files)
    target: Optional[dict] = None  # target: the budget, the search trace and cost, the full-val re-check
    deploy_imgsz: Optional[int] = None  # target.imgsz: the input size chosen to deploy at (metrics_after are at it)
    resize_baseline: Optional[dict] = None  # bench of a channel prune: the dense model at a lower --img as fast

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "report entry") -> "ReportEntry":
        """Validate ``data`` (e.g. an entry read back from ``prune_report.json``) and build the entry.

        Raises ``ValueError`` naming the key for an unknown or missing key, a wrong type or an unknown mode.
        """
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
        required = [n for n, f in names.items() if f.default is MISSING and f.default_factory is MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
        for key, types in _ENTRY_TYPES.items():
            v = data.get(key)
            if v is not None and not isinstance(v, types):
                raise ValueError(f"{where}: '{key}' must be {types}, got {type(v).__name__}")
        if data["mode"] not in MODES:
            raise ValueError(f"{where}: 'mode' must be one of {', '.join(MODES)}, got {data['mode']!r}")
        return cls(**dict(data))


_ENTRY_TYPES: dict[str, Any] = {
    "checkpoint": str, "output": str, "mode": str, "method": str, "amount": (int, float), "device": str,
    "imgsz": int, "prune_seconds": (int, float), "sparsity_before": dict, "sparsity_after": dict,
    "sparsity_all_conv": dict, "metrics_before": dict, "metrics_before_source": str, "metrics_oneshot": dict,
    "metrics_after": dict, "eval": dict, "method_details": dict, "exports": list, "finetune": dict,
    "schedule": dict, "leaks": dict, "structure": str, "channels": dict, "recalibration": dict, "bench": list,
    "target": dict, "deploy_imgsz": int, "resize_baseline": dict,
}


REPORT_KEYS = {"plugin", "version", "created", "config", "mode", "results", "history", "sweep"}


def validate_report(data: Mapping[str, Any], where: str = "prune_report.json") -> list[ReportEntry]:
    """Check a ``prune_report.json`` document against :class:`ReportEntry`; returns its entries."""
    unknown = sorted(set(data) - REPORT_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown top-level key(s) {', '.join(unknown)}")
    for k in ("plugin", "version", "created", "config", "results"):
        if k not in data:
            raise ValueError(f"{where}: missing top-level key {k!r}")
    if not isinstance(data["results"], list) or not data["results"]:
        raise ValueError(f"{where}: 'results' must be a non-empty list")
    return [ReportEntry.from_dict(e, f"{where}: results[{i}]") for i, e in enumerate(data["results"])]


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "int":
        return f"{int(v):,}"
    if kind == "pct":
        return f"{100 * v:.2f}%"
    return f"{v:.4f}"


def format_table(entry: dict) -> str:
    """One before/after table for a pruned checkpoint (an entry of ``prune_report.json``)."""
    b, a = entry.get("metrics_before") or {}, entry.get("metrics_after") or {}
    sb, sa, o = entry.get("sparsity_before") or {}, entry.get("sparsity_after") or {}, entry.get("metrics_oneshot")
    rows: list[tuple[str, Any, Any, str]] = [
        ("P", b.get("P"), a.get("P"), "f"), ("R", b.get("R"), a.get("R"), "f"),
        ("mAP50", b.get("mAP50"), a.get("mAP50"), "f"), ("mAP50-95", b.get("mAP50-95"), a.get("mAP50-95"), "f"),
        ("parameters", sb.get("parameters"), sa.get("parameters"), "int"),
        ("non-zero Conv2d weights", sb.get("nonzero"), sa.get("nonzero"), "int"),
        ("Conv2d sparsity", sb.get("sparsity"), sa.get("sparsity"), "pct"),
    ]
    ch = entry.get("channels")
    if ch:  # channel mode: a smaller model
        rows += [("Conv2d weights", ch.get("conv_weights_before"), ch.get("conv_weights_after"), "int"),
                 ("GFLOPs", ch.get("gflops_before"), ch.get("gflops_after"), "f")]
    for row in (entry.get("bench") or [])[1:]:
        for k in ("onnxruntime", "torch"):
            if row.get(f"{k}_median_ms") is not None:
                rows.append((f"{k} latency ms (x{row.get(f'{k}_speedup')})",
                             entry["bench"][0].get(f"{k}_median_ms"), row[f"{k}_median_ms"], "f"))
    rb = entry.get("resize_baseline")
    if rb:  # what --img alone gives at the pruned file's speed
        rows.append((f"mAP50-95 dense at --img {rb['imgsz']} (x{rb['speedup']})", None,
                     rb["metrics"].get("mAP50-95"), "f"))
    if o:  # fine-tune mode: where the one-shot pruned model stood before fine-tuning
        rows.insert(4, ("mAP50-95 one-shot (no fine-tune)", b.get("mAP50-95"), o.get("mAP50-95"), "f"))
    for art in entry.get("exports") or []:
        rows.append((f"{art['format']} bytes (gzip)", None, art.get("gzip_bytes"), "int"))
    w0 = max(len(r[0]) for r in rows)
    lines = [_title(entry), f"{'':<{w0}}  {'before':>14}  {'after':>14}  {'change':>10}"]
    for name, vb, va, kind in rows:
        change = ""
        if vb is not None and va is not None and kind != "int":
            d = va - vb
            change = f"{100 * d:+.2f}pp" if kind == "pct" else f"{d:+.4f}"
        elif vb is not None and va is not None and kind == "int" and vb:
            change = f"{100 * (va - vb) / vb:+.1f}%"
        lines.append(f"{name:<{w0}}  {_fmt(vb, kind):>14}  {_fmt(va, kind):>14}  {change:>10}")
    schedule = entry.get("mode") == "schedule"  # "before" is the dense model, not the (pruned) source file
    if (not b or schedule) and entry.get("metrics_before_source"):  # e.g. a resumed schedule run: why it is empty
        lines.append(f"(before: {entry['metrics_before_source']})")
    for label, m in (("before", b), ("after", a)):
        if m.get("nms_timeouts"):
            lines.append(f"! {label}: YOLOv5's NMS hit its time limit in {m['nms_timeouts']} batch(es); "
                         "mAP is undercounted (busy CPU)")
    kept = (a.get("mAP50-95") / b["mAP50-95"]) if a.get("mAP50-95") is not None and b.get("mAP50-95") else None
    if kept is not None and kept < LOW_RETENTION and entry.get("mode", "oneshot") == "oneshot":
        hint = ("removing whole channels needs training to recover" if ch else "a data-aware method (method: obs) "
                "or less sparsity keeps more")
        lines.append(f"! one-shot pruning kept {kept:.0%} of mAP50-95: {hint}; fine-tune the pruned model with "
                     "'finetune: {epochs: N}' (--prune-finetune-epochs N; yolo-prune prune --finetune-epochs N), "
                     "see docs/usage.md 'Recovery'")
    for art in entry.get("exports") or []:
        if not art.get("ok"):
            lines.append(f"! {art['format']} export FAILED verification: {art.get('message')}")
    return "\n".join(lines)


def _title(entry: Mapping[str, Any]) -> str:
    """``best.pt -> best_pruned.pt  (structure=channel, importance=taylor, amount=0.3, mode=oneshot)``; a schedule
    run's "before" is the dense model (its source file is already pruned)."""
    mode = entry.get("mode", "oneshot")
    before = "dense model" if mode == "schedule" else Path(entry["checkpoint"]).name
    if entry.get("structure", "unstructured") == "channel":
        how = f"structure=channel, importance={(entry.get('channels') or {}).get('importance', '?')}"
    else:
        how = f"method={entry['method']}"
    return f"{before} -> {Path(entry['output']).name}  ({how}, amount={entry['amount']}, mode={mode})"


def print_report(entries: list[dict], echo: Optional[Callable[[str], None]] = None) -> str:
    text = "\n\n".join(format_table(e) for e in entries)
    (echo or print)(text)
    return text
