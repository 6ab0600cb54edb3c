"""Latency benchmark of YOLOv5 checkpoints: PyTorch eager and ONNX Runtime CPU, side by side in one process.

Each file is loaded as YOLOv5's ``export.py`` loads it (``attempt_load``, BatchNorm fused, fp32, eval) and
exported to ONNX with YOLOv5's own ``export.run`` into a temporary folder (nothing is written beside the
weights), quietly: YOLOv5's export banner would only name that folder's files. After ``warmup`` calls per
model, ``runs`` rounds time every model once per round (round-robin), so a change in machine load hits all
models alike; the median and 90th percentile are reported, and the speed-up is the first file's median over
each file's median.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..backend.checks import check_device
from ..backend.calls import export_run
from ..backend.loading import get_backend, load_checkpoint
from ..backend.patches import export_patches, muted_yolov5
from ..errors import ConfigError, ExportError
from ..utils.progress import progress as progress_bar

LOGGER = logging.getLogger("yolo_prune_plugin")

BACKENDS = ("torch", "onnxruntime")


def _export_onnx(b: Any, weights: Path, tmp: Path, imgsz: int, batch: int) -> Path:
    """``weights`` exported to ONNX in ``tmp``, quietly (:func:`export_patches`: YOLOv5's banner would name files
    in ``tmp``); its path. A failure raises :class:`ExportError` with YOLOv5's reason."""
    src = tmp / weights.name
    shutil.copyfile(weights, src)
    with export_patches(b) as failures:
        try:
            export_run(b, weights=str(src), imgsz=[imgsz, imgsz], batch_size=batch, device="cpu",
                       include=("onnx",))
        except Exception as e:  # noqa: BLE001
            failures.append(f"{type(e).__name__}: {e}")
    out = src.with_suffix(".onnx")
    if not out.is_file():
        raise ExportError(f"{weights}: YOLOv5's ONNX export failed ({(failures or ['no file written'])[-1]})")
    return out


def _stats(ms: list[float]) -> tuple[float, float]:
    a = np.asarray(ms)
    return round(float(np.median(a)), 3), round(float(np.percentile(a, 90)), 3)


def bench_files(files: Sequence[str | Path], imgsz: int = 640, batch: int = 1, threads: Optional[int] = None,
                runs: int = 50, warmup: int = 5, backends: Sequence[str] = BACKENDS,
                progress: bool = True, device: str = "cpu", sizes: Optional[Sequence[int]] = None) -> list[dict]:
    """Time each checkpoint in ``files`` (PyTorch eager and/or ONNX Runtime CPU); one dict per file.

    Keys: ``file``, ``params``, ``gflops`` (YOLOv5's thop formula at ``imgsz``), ``pt_bytes``, ``onnx_bytes``,
    ``<backend>_median_ms``, ``<backend>_p90_ms``, ``<backend>_speedup`` (first file's median / this median),
    and the settings. ``sizes``: each file's own input size (default ``imgsz`` for all; a model to deploy at a
    smaller size is timed at it against the first at its own). ``threads``: torch intra-op threads and ONNX Runtime ``intra_op_num_threads`` (default:
    each library's own). ``device``: where PyTorch eager runs (``cpu``, ``0``/``cuda:0``; CUDA runs are
    synchronised before each time is taken); ONNX Runtime always runs on the CPU. Raises :class:`ConfigError` for
    bad arguments or a missing onnxruntime.
    """
    files = [Path(f).expanduser().resolve() for f in files]
    if not files:
        raise ConfigError("bench: no --weights given")
    backends = [str(x).lower() for x in backends]
    for k in backends:
        if k not in BACKENDS:
            raise ConfigError(f"bench backend {k!r} is unknown; expected {', '.join(BACKENDS)}")
    for name, v, lo in (("imgsz", imgsz, 32), ("batch", batch, 1), ("runs", runs, 1), ("warmup", warmup, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ConfigError(f"bench {name}: expected an integer >= {lo}, got {v!r}")
    sizes = list(sizes) if sizes is not None else [imgsz] * len(files)
    if len(sizes) != len(files) or any(not isinstance(v, int) or isinstance(v, bool) or v < 32 for v in sizes):
        raise ConfigError(f"bench sizes: expected one integer >= 32 per file, got {sizes!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"bench threads: expected an integer >= 1, got {threads!r}")
    if "onnxruntime" in backends:
        require_onnxruntime("bench with onnxruntime")
    check_device(device, "bench --device")
    dev = torch.device(f"cuda:{device}" if str(device).isdigit() else (device or "cpu"))
    b = get_backend()
    for f in files:
        load_checkpoint(f, b)  # clear error for a missing / unsafe / non-YOLOv5 file before any work
    tmp = Path(tempfile.mkdtemp(prefix="yolo-prune-bench-"))
    try:
        with torch_threads(threads):
            made = [make_runner(f, tmp / str(i), bench_input(batch, sz), backends, dev, threads, b)
                    for i, (f, sz) in enumerate(zip(files, sizes))]
            rows = [r for r, _ in made]
            for row, sz in zip(rows, sizes):
                row.update(runs=runs, imgsz=sz, batch=batch)
            times = time_side_by_side([fns for _, fns in made], runs, warmup, progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for row, t in zip(rows, times):
        for k, ms in t.items():
            row[f"{k}_median_ms"], row[f"{k}_p90_ms"] = _stats(ms)
    for k in backends:
        ref = rows[0].get(f"{k}_median_ms")
        for row in rows:
            med = row.get(f"{k}_median_ms")
            row[f"{k}_speedup"] = round(ref / med, 3) if ref and med else None
    return rows


def bench_against_resizing(base: Path, out: Path, imgsz: int, deploy: int, sizes: Sequence[int],
                           evaluate_at: Callable[[int], dict], runs: int = 30,
                           warmup: int = 5) -> tuple[list[dict], Optional[dict]]:
    """``out`` (at ``deploy``) and ``base`` at ``imgsz`` and at each size of ``sizes`` below ``imgsz``, timed in one
    side-by-side run; ``base`` is then evaluated (``evaluate_at(size)`` -> metrics) at the largest lower size that
    is at least as fast as ``out`` (the fastest one when none is): what ``--img`` alone gives at that speed.
    Returns the rows of ``base`` and ``out`` (as :func:`bench_files`) and that resize baseline (None: no lower
    size)."""
    lower = [s for s in sizes if s < imgsz]
    rows = bench_files([base, out] + [base] * len(lower), imgsz=imgsz, batch=1, runs=runs, warmup=warmup,
                       sizes=[imgsz, deploy, *lower])
    if not lower:
        return rows, None
    k = "onnxruntime" if rows[1].get("onnxruntime_speedup") else "torch"
    target = rows[1][f"{k}_speedup"]
    points = [{"imgsz": s, "speedup": r[f"{k}_speedup"], "median_ms": r[f"{k}_median_ms"]}
              for s, r in zip(lower, rows[2:])]
    fast = [p for p in points if p["speedup"] >= target]
    pick = max(fast, key=lambda p: p["imgsz"]) if fast else max(points, key=lambda p: p["speedup"])
    return rows[:2], {"runtime": k, "pruned_speedup": target, "imgsz": pick["imgsz"], "speedup": pick["speedup"],
                      "as_fast": bool(fast), "metrics": evaluate_at(pick["imgsz"]), "sizes": points}


def describe_resize_baseline(baseline: dict, after: Optional[dict]) -> tuple[str, bool]:
    """One line comparing the pruned file with the dense model at the lower ``--img`` of ``baseline``; True when
    resizing alone is at least as fast and at least as accurate (then pruning did not earn its place)."""
    m = baseline["metrics"].get("mAP50-95")
    pruned = (after or {}).get("mAP50-95")
    text = (f"dense at --img {baseline['imgsz']}: {baseline['speedup']:.2f}x faster ({baseline['runtime']}), "
            f"mAP50-95 {m:.4f}; pruned file: {baseline['pruned_speedup']:.2f}x, mAP50-95 "
            + ("-" if pruned is None else f"{pruned:.4f}"))
    worse = baseline["as_fast"] and pruned is not None and m >= pruned
    return text, worse


def require_onnxruntime(what: str) -> None:
    """Raise :class:`ConfigError` naming ``what`` when onnx or onnxruntime is not importable."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        raise ConfigError(f"{what} needs onnx and onnxruntime: pip install yolo_prune_plugin[export]")


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """torch intra-op threads set to ``threads`` (None: unchanged) while the block runs."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def bench_input(batch: int, imgsz: int) -> torch.Tensor:
    """The seeded input every timed model gets."""
    return torch.rand(batch, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0))


def make_runner(f: Path, tmp: Path, x: torch.Tensor, backends: Sequence[str], dev: torch.device,
                threads: Optional[int], b: Any) -> tuple[dict, dict[str, Callable[[], Any]]]:
    """One checkpoint ready to time: its row (params, GFLOPs, sizes) and one call per backend (ONNX: exported
    with YOLOv5's ``export.run`` into ``tmp``, which the caller deletes). YOLOv5's log of the loading and the
    export is not shown (:func:`~yolo_prune_plugin.backend.patches.muted_yolov5`); an export failure raises
    :class:`ExportError` with YOLOv5's reason."""
    from ..backend.artifacts import load_export_model
    from ..prune.channel import gflops

    batch, imgsz = int(x.shape[0]), int(x.shape[-1])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with muted_yolov5(b):  # YOLOv5's "Fusing layers..." and layer summary
        model = load_export_model(f, "cpu", b)
    row: dict[str, Any] = {"file": str(f), "name": f.name, "params": sum(p.numel() for p in model.parameters()),
                           "gflops": gflops(model, imgsz), "pt_bytes": f.stat().st_size, "onnx_bytes": None,
                           "imgsz": imgsz, "batch": batch, "threads": threads, "torch_device": str(dev)}
    fns: dict[str, Callable[[], Any]] = {}
    if "torch" in backends:
        xt = x.to(dev)

        def run_torch(m: torch.nn.Module = model.to(dev), xi: torch.Tensor = xt) -> None:
            with torch.inference_mode():
                m(xi)
            sync()
        fns["torch"] = run_torch
    if "onnxruntime" in backends:
        import onnxruntime as ort

        tmp.mkdir(parents=True, exist_ok=True)
        onnx_path = _export_onnx(b, f, tmp, imgsz, batch)
        row["onnx_bytes"] = onnx_path.stat().st_size
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x.numpy()}
        fns["onnxruntime"] = (lambda s=sess, fd=feed: s.run(None, fd))
    return row, fns


def time_side_by_side(runners: Sequence[dict[str, Callable[[], Any]]], runs: int, warmup: int,
                      progress: bool = False) -> list[dict[str, list[float]]]:
    """``warmup`` untimed calls each, then ``runs`` rounds calling every runner once per round (round-robin, so
    load changes hit all alike); milliseconds per call, per runner and backend."""
    times: list[dict[str, list[float]]] = [{k: [] for k in fns} for fns in runners]
    for fns in runners:
        for fn in fns.values():
            for _ in range(warmup):
                fn()
    # on a terminal only (YOLO_PRUNE_PROGRESS=1/0 forces it), never hundreds of '\r' updates in a pipe or log
    bar = progress_bar(desc="bench", total=runs * sum(len(fns) for fns in runners)) if progress else None
    for _ in range(runs):
        for fns, t in zip(runners, times):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                t[k].append((time.perf_counter() - t0) * 1000)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return times


def format_bench_table(rows: Sequence[dict]) -> str:
    """A fixed-width table of :func:`bench_files` rows (one line per file)."""
    ks = [k for k in BACKENDS if any(f"{k}_median_ms" in r for r in rows)]
    head = f"{'weights':<28}{'params':>10}{'GFLOPs':>8}{'.pt MB':>8}{'.onnx MB':>9}"
    for k in ks:
        label = "torch" if k == "torch" else "ORT"
        head += f"{label + ' med ms':>14}{'p90':>8}{'speed-up':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        onnx = f"{r['onnx_bytes'] / 1e6:.2f}" if r.get("onnx_bytes") else "-"
        line = (f"{r['name'][:27]:<28}{r['params']:>10,}{r['gflops'] or 0:>8.2f}{r['pt_bytes'] / 1e6:>8.2f}"
                f"{onnx:>9}")
        for k in ks:
            line += f"{r[f'{k}_median_ms']:>14.1f}{r[f'{k}_p90_ms']:>8.1f}{r[f'{k}_speedup']:>8.2f}x"
        lines.append(line)
    r0 = rows[0] if rows else {}
    lines.append(f"(imgsz {r0.get('imgsz')}, batch {r0.get('batch')}, threads {r0.get('threads') or 'default'}, "
                 f"{r0.get('runs')} runs each, round-robin; speed-up vs {r0.get('name')}; load {os.getloadavg()[0]:.2f})")
    return "\n".join(lines)


__all__ = ["bench_files", "bench_against_resizing", "describe_resize_baseline", "format_bench_table", "make_runner", "time_side_by_side", "torch_threads", "bench_input",
           "require_onnxruntime",
           "BACKENDS"]
