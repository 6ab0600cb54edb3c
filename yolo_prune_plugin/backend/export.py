"""Export a pruned checkpoint with YOLOv5's own ``export.run`` and prove the zeros survived.

For each requested format the artefact is produced next to the weights file, under YOLOv5's own name
(``best_pruned.pt`` -> ``best_pruned.onnx``, ``best_pruned.torchscript``), and verified before it is put there:

1. the zero-valued Conv weights the artefact actually carries are counted and compared with the pruned model's;
2. the artefact is run (onnxruntime / ``torch.jit``) next to the pruned ``.pt`` model (fused, eval, fp32) on the
   same deterministic input, and the largest absolute difference of the predictions is reported.

Safety: YOLOv5 exports from a *copy* of the weights inside a temporary folder beside them; an artefact that
verifies is moved into place with ``os.replace`` (atomic on one filesystem). An export that fails, or an
artefact that fails verification, is **not** moved into place and is deleted with the temporary folder: a file
named ``best_pruned.onnx`` next to the weights is therefore always one that passed. Any file that already had
that name is left unchanged in that case. The weights file and its neighbours (``best.pt``, ``last.pt``) are
never opened for writing.

Formats: only :data:`SUPPORTED_FORMATS` (``torchscript``, ``onnx``) are accepted. YOLOv5's other formats
(OpenVINO, TensorRT, CoreML, TensorFlow, PaddlePaddle) need toolchains the plugin cannot read back to count
zeros, so they are refused with a :class:`ConfigError` naming YOLOv5's own ``export.py`` instead of being
exported unverified.

YOLOv5 7.0.x quirks during the export (torch 2.9+'s dynamo ONNX exporter, files pickled under the other module
spelling) are handled by :func:`yolo_prune_plugin.backend.patches.export_patches`, for the export only. The export
runs quietly: YOLOv5's banner ("Export complete", "Detect: ... --weights <file>") would name the temporary copy,
which is gone by then; its failure lines are kept for the report. Each artefact put in place is logged once,
under its final path, with what its verification found.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError, ExportError, OutputExistsError
from .artifacts import SUPPORTED_FORMATS, ArtifactReport, file_sizes, load_export_model, verify_artifact
from .calls import export_run
from .loading import Backend, get_backend
from .patches import export_patches, muted_yolov5

LOGGER = logging.getLogger("yolo_prune_plugin")


#: Python packages each format needs beyond YOLOv5 (import name -> shown to the user).
FORMAT_REQUIREMENTS: dict[str, tuple[str, ...]] = {"torchscript": (), "onnx": ("onnx", "onnxruntime")}


EXTRA_HINT = "pip install yolo_prune_plugin[export]"


# --------------------------------------------------------------------------------------------------
# Checks done before anything is exported
# --------------------------------------------------------------------------------------------------
def _yolov5_formats(backend: Optional[Backend]) -> tuple[str, ...]:
    if backend is None:
        return ()
    try:
        return tuple(str(a) for a in backend.export.export_formats()["Argument"][1:])
    except Exception:  # noqa: BLE001 - only used to word an error message
        return ()


def normalize_formats(formats: Sequence[str] | str) -> list[str]:
    """Lower-case, strip and de-duplicate format names (``"onnx, torchscript"`` is accepted too)."""
    if isinstance(formats, str):
        formats = formats.split(",")
    out: list[str] = []
    for f in formats:
        f = str(f).strip().lower().lstrip(".")
        if f and f not in out:
            out.append(f)
    return out


def _missing_modules(names: Sequence[str]) -> list[str]:
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def check_export_requirements(formats: Sequence[str], *, simplify: bool = False,
                              backend: Optional[Backend] = None) -> None:
    """Raise :class:`ConfigError` for an unknown/unverifiable format or a missing optional package.

    Meant to run at start, before training or pruning, so a long run does not die at its last step.
    """
    fmts = normalize_formats(formats)
    allowed = ", ".join(SUPPORTED_FORMATS)
    if not fmts:
        raise ConfigError(f"export formats: none given (expected one or more of: {allowed})")
    for f in fmts:
        if f in SUPPORTED_FORMATS:
            continue
        try:
            backend = backend or get_backend()
        except Exception:  # noqa: BLE001 - the format is unknown either way
            backend = None
        if f in _yolov5_formats(backend):
            raise ConfigError(f"export format '{f}': YOLOv5 can export it but the plugin cannot verify that "
                              f"its zeros survive; allowed: {allowed} (use YOLOv5's export.py for '{f}')")
        raise ConfigError(f"export format '{f}' is unknown; allowed: {allowed}")
    needed = [m for f in fmts for m in FORMAT_REQUIREMENTS[f]]
    if "onnx" in fmts and simplify:
        needed.append("onnxsim")
    missing = _missing_modules(list(dict.fromkeys(needed)))
    if missing:
        what = ", ".join(missing)
        if missing == ["onnxsim"]:
            raise ConfigError("export simplify: true needs onnx-simplifier (missing module onnxsim): "
                              "pip install onnxsim, or set simplify: false")
        raise ConfigError(f"export to {', '.join(fmts)} needs {what} (not installed): {EXTRA_HINT}")


def _check_options(device: str, half: bool, dynamic: bool, atol: float, imgsz: Any) -> None:
    dev = str(device).strip().lower()
    if half and (dev == "cpu" or (dev == "" and not torch.cuda.is_available())):
        raise ConfigError("export half: true needs a CUDA device (YOLOv5 exports FP16 on GPU only); "
                          "set half: false or device: 0")
    if half and dynamic:
        raise ConfigError("export half and dynamic cannot both be true (YOLOv5 refuses the combination)")
    if not (isinstance(atol, (int, float)) and atol >= 0):
        raise ConfigError(f"export atol: expected a number >= 0, got {atol!r}")
    sizes = imgsz if isinstance(imgsz, (tuple, list)) else (imgsz,)
    if not sizes or len(sizes) > 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                               for s in sizes):
        raise ConfigError(f"export imgsz: expected a positive integer (or [height, width]), got {imgsz!r}")


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------
def artifact_path(weights: str | Path, fmt: str) -> Path:
    """Where YOLOv5 puts ``fmt``'s artefact for ``weights`` (same folder and stem, YOLOv5's suffix)."""
    return Path(weights).with_suffix(SUPPORTED_FORMATS[fmt])


def saved_deploy_imgsz(weights: Path, backend: Any = None) -> Optional[int]:
    """The ``deploy_imgsz`` a budget search stored in a pruned checkpoint (None: none stored or not a file)."""
    from .loading import load_checkpoint

    if not Path(weights).is_file():
        return None  # export_and_verify names the missing file
    prune = load_checkpoint(weights, backend).get("prune") or {}
    v = prune.get("deploy_imgsz") if isinstance(prune, dict) else None
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def export_and_verify(weights: str | Path, formats: Sequence[str], imgsz: int | Sequence[int] = 640,
                      device: str = "cpu", half: bool = False, dynamic: bool = False, simplify: bool = False,
                      opset: Optional[int] = None, atol: float = 1e-3, overwrite: bool = True,
                      backend: Optional[Backend] = None, announce: bool = True) -> list[ArtifactReport]:
    """Export ``weights`` to each format with YOLOv5's ``export.run``, verify, and move verified artefacts beside it.

    Raises :class:`ConfigError` (bad format/option, missing extra), :class:`OutputExistsError` (an artefact
    exists and ``overwrite`` is false; checked for every format before anything is exported) or
    :class:`CheckpointError` (unreadable weights). An export or verification failure does not raise: its report
    has ``ok=False``, ``written=False`` and says why; nothing beside the weights is created or changed for it.
    ``announce``: log one line per artefact written (its final path, size and verification); YOLOv5's own export
    log is never shown (it names the temporary copy).
    """
    b = backend or get_backend()
    fmts = normalize_formats(formats)
    check_export_requirements(fmts, simplify=simplify, backend=b)
    _check_options(device, half, dynamic, atol, imgsz)
    weights = Path(weights).expanduser().resolve()
    with muted_yolov5(b):  # "Fusing layers..." and the layer summary of the reference: not the user's concern
        reference = load_export_model(weights, "cpu", b)  # CheckpointError for a bad/unsafe file, before any export
    dests = {f: artifact_path(weights, f) for f in fmts}
    if not overwrite:
        existing = [str(p) for p in dests.values() if p.exists()]
        if existing:
            raise OutputExistsError(f"{', '.join(existing)} already exist(s); pass overwrite=True "
                                    "(--overwrite) or move it away")
    size = tuple(imgsz) if isinstance(imgsz, (list, tuple)) else (imgsz, imgsz)
    if len(size) == 1:
        size = (size[0], size[0])

    reports = _export_all(b, weights, fmts, dests, reference, size, device, half, dynamic, simplify, opset, atol)
    for r in reports:
        if r.written and announce:
            LOGGER.info("Exported %s (%.1f MB; verified: %s)", r.path, (r.bytes or 0) / 1e6,
                        r.message.removeprefix("ok: "))
    return reports


def _export_all(b: Backend, weights: Path, fmts: list[str], dests: dict[str, Path], reference: nn.Module,
                size: tuple, device: str, half: bool, dynamic: bool, simplify: bool, opset: Optional[int],
                atol: float) -> list[ArtifactReport]:
    """One quiet ``export.run`` for all formats from a copy in a temporary folder; verify each; move the good ones."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{weights.stem}-export-", dir=weights.parent))
    except OSError as e:
        raise ExportError(f"{weights.parent}: cannot create a temporary export folder beside the weights "
                          f"({e.strerror or e})") from None
    try:
        src = tmp / weights.name
        shutil.copyfile(weights, src)
        kwargs: dict[str, Any] = dict(weights=str(src), imgsz=list(size), device=device, include=tuple(fmts),
                                      half=half, dynamic=dynamic, simplify=simplify)
        if opset is not None:
            kwargs["opset"] = int(opset)
        with export_patches(b) as failures:
            try:
                export_run(b, **kwargs)
            except Exception as e:  # noqa: BLE001 - YOLOv5 asserts/raises outside its try_export too
                failures.append(f"{type(e).__name__}: {e}")
        cache: dict = {"model": reference}  # the reference output is computed once for all formats
        from ..utils.progress import progress

        return [_verify_and_place(b, fmt, artifact_path(src, fmt), dests[fmt], reference, size, device, atol,
                                  failures, cache) for fmt in progress(fmts, desc="verify exports", total=len(fmts))]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_LABELS = {"onnx": "onnx:", "torchscript": "torchscript:"}


def _verify_and_place(b: Backend, fmt: str, produced: Path, dest: Path, reference: nn.Module, size: tuple,
                      device: str, atol: float, failures: list[str], cache: dict) -> ArtifactReport:
    if not produced.is_file():
        mine = [f for f in failures if _LABELS[fmt] in f.lower()]
        why = (mine or failures or ["no file was written"])[-1]
        return ArtifactReport(format=fmt, path=str(dest), ok=False, atol=float(atol),
                              message=f"YOLOv5 export to {fmt} failed ({why}); {_not_written(dest)}")
    try:
        report = verify_artifact(produced, reference, imgsz=size, atol=atol, fmt=fmt, device=device, backend=b,
                                 _cache=cache)
    except ExportError as e:
        raw, packed = file_sizes(produced)
        return ArtifactReport(format=fmt, path=str(dest), ok=False, atol=float(atol), bytes=raw,
                              gzip_bytes=packed, message=f"{e}; {_not_written(dest)}")
    report.path = str(dest)
    if report.ok:
        os.replace(produced, dest)
        report.written = True
    else:
        report.message += f"; {_not_written(dest)}"
    return report


def _not_written(dest: Path) -> str:
    return f"not written ({dest.name} from before left unchanged)" if dest.exists() else "not written"
