"""Evaluation with YOLOv5's own validator (``val.run``), set up the way YOLOv5's final validation is."""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import torch
import torch.nn as nn

from ..errors import ConfigError
from .calls import create_dataloader, val_run
from .loading import Backend, get_backend
from .patches import driving_yolov5

LOGGER = logging.getLogger("yolo_prune_plugin")


@dataclass(frozen=True)
class Metrics:
    precision: float
    recall: float
    map50: float
    map: float  # mAP50-95
    nms_timeouts: int = 0  # batches where YOLOv5's NMS hit its time limit (metrics then undercount)
    nms_time_limit: str = "active"  # "lifted" when evaluated under no_nms_time_limit (reproducible)

    @classmethod
    def from_results(cls, results: Any, nms_timeouts: int = 0) -> "Metrics":
        """From YOLOv5's ``(P, R, mAP50, mAP50-95, box, obj, cls)`` tuple."""
        p, r, m50, m = (float(x) for x in list(results)[:4])
        return cls(p, r, m50, m, nms_timeouts)

    def to_dict(self) -> dict:
        d = {"P": round(self.precision, 6), "R": round(self.recall, 6), "mAP50": round(self.map50, 6),
             "mAP50-95": round(self.map, 6)}
        if self.nms_timeouts:
            d["nms_timeouts"] = self.nms_timeouts
        if self.nms_time_limit != "active":  # YOLOv5's own validation (limit active) keeps its plain keys
            d["nms_time_limit"] = self.nms_time_limit
        return d


class NMSTimeoutCounter(logging.Handler):
    """Counts YOLOv5's 'NMS time limit exceeded' warnings: on a slow or busy CPU they silently lower mAP."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "NMS time limit" in record.getMessage():
            self.count += 1


@dataclass
class EvalSettings:
    """The settings YOLOv5 used (or would use) for its final validation of a run."""

    data: dict  # output of check_dataset
    imgsz: int
    batch_size: int  # val batch size (train.py uses 2 x the training batch size)
    device: torch.device
    single_cls: bool = False
    workers: int = 8
    iou_thres: float = 0.6

    @property
    def half(self) -> bool:
        return self.device.type != "cpu"


def resolve_data(data: str | Path | dict, backend: Optional[Backend] = None) -> dict:
    """Load a data YAML through YOLOv5's ``check_dataset`` after checking it exists (no downloads)."""
    backend = backend or get_backend()
    if isinstance(data, dict):
        return data
    p = Path(data).expanduser()
    if not p.is_file():
        raise ConfigError(f"{p}: data YAML not found (expected a YOLOv5 dataset .yaml)")
    _check_data_yaml(p, backend)
    try:
        with driving_yolov5(backend):  # check_dataset downloads a font: optional offline
            data = backend.general.check_dataset(str(p.resolve()), autodownload=False)
    except Exception as e:  # noqa: BLE001 - YOLOv5 raises bare Exception/AssertionError for missing splits
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{p}: not a usable YOLOv5 dataset ({msg})") from None
    return {**data, "yaml_file": str(p.resolve())}  # messages about the data name the file


def _check_data_yaml(p: Path, backend: Backend) -> None:
    import yaml

    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: expected a YOLOv5 dataset mapping with 'train', 'val' and 'names'")
    missing = [k for k in ("train", "val", "names") if not d.get(k)]
    if missing:
        raise ConfigError(f"{p}: dataset YAML lacks {', '.join(repr(k) for k in missing)}")
    root = d.get("path")
    if root and not Path(str(root)).is_absolute():
        yolo_root = (Path(backend.general.ROOT) / str(root)).resolve()
        beside = (p.parent / str(root)).resolve()
        if not yolo_root.exists():
            hint = f"; did you mean {beside}?" if beside.exists() else ""
            raise ConfigError(f"{p}: 'path: {root}' is relative, and YOLOv5 resolves it against its own folder "
                              f"({yolo_root}, which does not exist); write an absolute path{hint}")


def write_absolute_data_yaml(src: str | Path, dest_dir: str | Path) -> Path:
    """Copy a data YAML into ``dest_dir`` with its relative ``path:`` made absolute (relative to ``src``'s folder).

    YOLOv5 resolves a relative ``path:`` against its own install folder; this is the fix for files written
    the usual way (``path: coco128`` beside the dataset).
    """
    import yaml

    src = Path(src).expanduser().resolve()
    d = yaml.safe_load(src.read_text(encoding="utf-8"))
    if not isinstance(d, dict):
        raise ConfigError(f"{src}: expected a YOLOv5 dataset mapping")
    root = Path(str(d.get("path") or "."))
    d["path"] = str(root if root.is_absolute() else (src.parent / root).resolve())
    out = Path(dest_dir) / src.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
    return out


def is_coco(data: dict) -> bool:
    val = data.get("val")
    return isinstance(val, str) and val.replace("\\", "/").endswith("coco/val2017.txt")


def make_settings(data: str | Path | dict, imgsz: int, batch_size: int, device: Any = "",
                  single_cls: bool = False, workers: int = 8, backend: Optional[Backend] = None) -> EvalSettings:
    backend = backend or get_backend()
    data_dict = resolve_data(data, backend)
    dev = device if isinstance(device, torch.device) else backend_select_device(backend, device, batch_size)
    iou = 0.65 if is_coco(data_dict) else 0.60  # as train.py's final validation
    return EvalSettings(data_dict, imgsz, batch_size, dev, single_cls, workers, iou)


def backend_select_device(backend: Backend, device: Any, batch_size: int = 0) -> torch.device:
    torch_utils = __import__(backend.prefix + "utils.torch_utils", fromlist=["select_device"])
    return torch_utils.select_device(str(device), batch_size=batch_size)


def make_dataloader(settings: EvalSettings, stride: int = 32, backend: Optional[Backend] = None):
    """The val dataloader exactly as train.py builds it (rect, pad 0.5), built once and reusable."""
    backend = backend or get_backend()
    return create_dataloader(settings.data["val"], settings.imgsz, settings.batch_size, stride, backend,
                             single_cls=settings.single_cls, hyp=None, rect=True, rank=-1,
                             workers=settings.workers, pad=0.5, prefix=backend.general.colorstr("val: "))


def evaluate(model: nn.Module, settings: EvalSettings, dataloader: Any = None,
             backend: Optional[Backend] = None) -> Metrics:
    """Validate ``model`` (a loaded YOLOv5 model, as ``attempt_load`` returns) with YOLOv5's ``val.run``.

    Uses the model-passed path of ``val.run`` that train.py uses for its final validation; outputs YOLOv5's
    validator writes (results.html) go to a temporary folder, never the run folder. YOLOv5's NMS time limit
    is lifted (:class:`~yolo_prune_plugin.backend.evaluation.no_nms_time_limit`), so a busy CPU cannot drop detections;
    the metrics record ``nms_time_limit: lifted``.
    """
    backend = backend or get_backend()
    p = next(model.parameters())
    if p.device != settings.device or (settings.half and p.dtype != torch.float16):
        model = copy.deepcopy(model).to(settings.device)  # never move or half() the caller's model
    stride = max(int(model.stride.max()), 32) if hasattr(model, "stride") else 32
    if dataloader is None:
        dataloader = make_dataloader(settings, stride, backend)
    counter = NMSTimeoutCounter()
    yolo_logger = logging.getLogger(getattr(backend.general, "LOGGING_NAME", "yolov5"))
    yolo_logger.addHandler(counter)
    try:
        with tempfile.TemporaryDirectory(prefix="yolo_prune_val_") as tmp, driving_yolov5(backend), \
                no_nms_time_limit(backend):
            results = val_run(backend, settings.data, batch_size=settings.batch_size, imgsz=settings.imgsz,
                              model=model.half() if settings.half else model, iou_thres=settings.iou_thres,
                              single_cls=settings.single_cls, dataloader=dataloader, save_dir=Path(tmp),
                              plots=False, half=settings.half, verbose=False)[0]
    finally:
        yolo_logger.removeHandler(counter)
    if counter.count:
        LOGGER.warning("yolo_prune_plugin: YOLOv5's NMS hit its time limit in %d batch(es); mAP is undercounted "
                       "(slow or busy CPU). Re-validate on an idle machine or a GPU for exact numbers.", counter.count)
    return dataclasses.replace(Metrics.from_results(results, counter.count), nms_time_limit=no_nms_time_limit.status)


def evaluate_weights(weights: str | Path, settings: EvalSettings, dataloader: Any = None,
                     backend: Optional[Backend] = None) -> Metrics:
    """Load ``weights`` with YOLOv5's ``attempt_load`` (fused, ``ema`` first) and :func:`evaluate` it."""
    backend = backend or get_backend()
    model = backend.attempt_load(weights, settings.device)
    return evaluate(model, settings, dataloader, backend)


# --------------------------------------------------------------------------------------------------
# Reproducible evaluation: YOLOv5's NMS time limit, lifted for the plugin's own validation
# --------------------------------------------------------------------------------------------------
class _FrozenClock:
    """Stands in for the ``time`` module inside YOLOv5's NMS: ``time()`` does not advance."""

    def __init__(self, real: ModuleType) -> None:
        self._real = real
        self._t = real.time()

    def time(self) -> float:
        return self._t

    def __getattr__(self, name: str) -> Any:  # everything else is the real module
        return getattr(self._real, name)


def _nms_holders(backend: Backend) -> list[ModuleType]:
    """Modules through which YOLOv5's validator reaches ``non_max_suppression`` (both spellings, if loaded)."""
    names = [backend.val.__name__] + [p + "val" for p in ("", "yolov5.")]
    return [m for m in dict.fromkeys(sys.modules.get(n) for n in names) if m is not None
            and callable(getattr(m, "non_max_suppression", None))]


class no_nms_time_limit:  # noqa: N801 - used like a function: ``with no_nms_time_limit(backend):``
    """Context manager: YOLOv5's ``non_max_suppression`` never gives up on its time limit while inside.

    YOLOv5's NMS (``utils/general.py``) stops after ``0.5 + 0.05 * batch`` seconds measured with
    ``time.time()`` and silently drops the remaining images' detections, so on a slow or busy CPU the same
    model scores differently from run to run. Inside this block the validator's ``non_max_suppression``
    (``val.non_max_suppression`` under every loaded spelling) is wrapped: during each call the ``time``
    module seen by the NMS function is replaced by a clock that does not advance, so the limit is never
    reached. Everything is restored on exit; the NMS code and its results are otherwise YOLOv5's own.
    Re-entrant (nested blocks leave the outer wrapping in place).
    """

    status = "lifted"  # what reports record as ``nms_time_limit``

    def __init__(self, backend: Optional[Backend] = None) -> None:
        self.backend = backend
        self._undo: list[tuple[ModuleType, Any]] = []

    def __enter__(self) -> "no_nms_time_limit":
        backend = self.backend or get_backend()
        for mod in _nms_holders(backend):
            orig = mod.non_max_suppression
            if getattr(orig, "_yolo_prune_no_limit", False):
                continue

            def nms(*args: Any, _orig: Any = orig, **kwargs: Any) -> Any:
                g = _orig.__globals__
                real = g.get("time")
                if real is None or isinstance(real, _FrozenClock):
                    return _orig(*args, **kwargs)
                g["time"] = _FrozenClock(real)
                try:
                    return _orig(*args, **kwargs)
                finally:
                    g["time"] = real

            nms._yolo_prune_no_limit = True  # type: ignore[attr-defined]
            nms.__wrapped__ = orig  # type: ignore[attr-defined]
            mod.non_max_suppression = nms
            self._undo.append((mod, orig))
        return self

    def __exit__(self, *exc: Any) -> None:
        for mod, orig in reversed(self._undo):
            mod.non_max_suppression = orig
        self._undo.clear()

