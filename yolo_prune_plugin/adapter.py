"""The one module that knows YOLOv5's quirks.

It finds YOLOv5 (the PyPI package ``yolov5`` importing as ``yolov5.*``, or an upstream
ultralytics/yolov5 checkout importing as ``models.*``, ``utils.*``, ``train``, ``val``, ``export``),
makes 7.0.x work on today's torch/numpy/Pillow, and loads checkpoints through an allow-list of the
YOLOv5/torch classes instead of turning ``torch.load``'s ``weights_only`` off.

Everything else in the plugin talks to YOLOv5 through :func:`get_backend`.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import pickle
import sys
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from .errors import CheckpointError, PruneError, UnsafeCheckpointError

LOGGER = logging.getLogger("yolo_prune_plugin")

#: Environment variable naming an upstream ultralytics/yolov5 checkout to use instead of PyPI ``yolov5``.
YOLOV5_DIR_ENV = "YOLO_PRUNE_YOLOV5_DIR"
#: Environment variable that, set to ``1``, loads checkpoints with ``weights_only=False`` (trusted files only).
TRUST_ENV = "YOLO_PRUNE_TRUST_CHECKPOINTS"

# Module paths (relative to the YOLOv5 root) whose nn.Module classes real checkpoints pickle.
_MODEL_MODULES = ("models.common", "models.yolo", "models.experimental")

# torch classes YOLOv5 detection models are built from (models/common.py, models/yolo.py, experimental.py).
_TORCH_CLASSES: tuple[type, ...] = (
    nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish,
    nn.Sigmoid, nn.Identity, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Upsample, nn.Sequential, nn.ModuleList,
    nn.Linear, nn.Dropout, nn.Flatten, nn.LayerNorm, nn.MultiheadAttention,
    nn.modules.linear.NonDynamicallyQuantizableLinear,
)


@dataclass(frozen=True)
class Backend:
    """The YOLOv5 modules in use, whichever way YOLOv5 is installed."""

    kind: str  # "pypi" or "checkout"
    root: Path
    prefix: str  # "yolov5." for the PyPI package, "" for a checkout
    train: ModuleType
    val: ModuleType
    export: ModuleType
    callbacks: ModuleType
    general: ModuleType
    experimental: ModuleType
    yolo: ModuleType

    @property
    def Callbacks(self) -> type:  # noqa: N802 - mirrors YOLOv5's class name
        return self.callbacks.Callbacks

    def attempt_load(self, weights: str | Path, device: Any = None, fuse: bool = True) -> nn.Module:
        """YOLOv5's own ``attempt_load`` (takes ``ema`` before ``model``)."""
        return self.experimental.attempt_load(str(Path(weights).resolve()), device=device, fuse=fuse)


_backend: Optional[Backend] = None
_lock = threading.Lock()


def get_backend(yolov5_dir: str | Path | None = None) -> Backend:
    """Import YOLOv5 once, apply the compatibility patches and return its modules.

    ``yolov5_dir`` (or the ``YOLO_PRUNE_YOLOV5_DIR`` environment variable) selects an upstream checkout;
    otherwise the PyPI package ``yolov5`` is used.
    """
    global _backend
    with _lock:
        wanted = yolov5_dir or os.environ.get(YOLOV5_DIR_ENV) or None
        if _backend is not None:
            if wanted and Path(wanted).resolve() != _backend.root.resolve():
                raise PruneError(f"YOLOv5 is already imported from {_backend.root}; cannot switch to {wanted} "
                                 "in the same process")
            return _backend
        _backend = _import_checkout(Path(wanted)) if wanted else _import_pypi()
        apply_compat_patches(_backend)
        return _backend


def _import_pypi() -> Backend:
    try:
        pkg = importlib.import_module("yolov5")
    except ImportError as e:
        raise PruneError("YOLOv5 is not installed: `pip install yolov5==7.0.14`, or point "
                         f"--yolov5-dir / {YOLOV5_DIR_ENV} at an ultralytics/yolov5 checkout") from e
    root = Path(pkg.__file__).resolve().parent
    return _load_modules("pypi", root, "yolov5.")


def _import_checkout(root: Path) -> Backend:
    root = root.expanduser().resolve()
    missing = [n for n in ("train.py", "val.py", "export.py", "models/yolo.py", "utils/callbacks.py")
               if not (root / n).is_file()]
    if missing:
        raise PruneError(f"{root} is not a YOLOv5 checkout: missing {', '.join(missing)}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return _load_modules("checkout", root, "")


def _load_modules(kind: str, root: Path, prefix: str) -> Backend:
    def imp(name: str) -> ModuleType:
        return importlib.import_module(prefix + name)

    # val/export/train import plots, which import the font check: import general first to patch it early.
    general = imp("utils.general")
    return Backend(kind=kind, root=root, prefix=prefix, general=general, callbacks=imp("utils.callbacks"),
                   experimental=imp("models.experimental"), yolo=imp("models.yolo"), val=imp("val"),
                   export=imp("export"), train=imp("train"))


# --------------------------------------------------------------------------------------------------
# Compatibility patches for YOLOv5 7.0.x on today's stack
# --------------------------------------------------------------------------------------------------
_patched = False


def apply_compat_patches(backend: Backend) -> None:
    """Make YOLOv5 7.0.x run on torch >= 2.6, numpy >= 2.4, Pillow >= 10 and offline machines."""
    global _patched
    if _patched:
        return
    _patched = True
    register_safe_globals(backend)
    _patch_numpy()
    _patch_pillow()
    _patch_font_download(backend)


def _patch_numpy() -> None:
    import numpy as np

    if not hasattr(np, "trapz") and hasattr(np, "trapezoid"):  # removed in numpy 2.4; YOLOv5's AP uses it
        np.trapz = np.trapezoid  # type: ignore[attr-defined]


def _patch_pillow() -> None:
    """Pillow >= 10 removed ``getsize``; YOLOv5's plotting threads still call it."""
    from PIL import ImageFont

    def getsize(self: Any, text: str, *args: Any, **kwargs: Any) -> tuple[int, int]:
        left, top, right, bottom = self.getbbox(text, *args, **kwargs)
        return int(right), int(bottom)

    for cls in (ImageFont.FreeTypeFont, ImageFont.ImageFont, getattr(ImageFont, "TransposedFont", None)):
        if cls is not None and not hasattr(cls, "getsize") and hasattr(cls, "getbbox"):
            cls.getsize = getsize  # type: ignore[attr-defined]


def _patch_font_download(backend: Backend) -> None:
    """Offline, ``check_dataset`` dies trying to download Arial.ttf: make the font optional.

    Patched under every spelling already imported (a checkout's ``utils.general``, the package's
    ``yolov5.utils.general``), since YOLOv5's modules may reach either.
    """
    from urllib.error import URLError

    for prefix in dict.fromkeys((backend.prefix, "", "yolov5.")):
        general, plots = sys.modules.get(prefix + "utils.general"), sys.modules.get(prefix + "utils.plots")
        if general is None or getattr(general.check_font, "_yolo_prune_patched", False):
            continue
        original = general.check_font

        def check_font(font: Any = "Arial.ttf", progress: bool = False, _orig: Any = original) -> None:
            try:
                _orig(font, progress=progress)
            except Exception as e:  # noqa: BLE001 - any download failure: plots use PIL's default font
                LOGGER.debug("font %s unavailable (%s); YOLOv5 plots use PIL's default font", font, e)

        def plots_check_font(font: Any = "Arial.ttf", progress: bool = False, _orig: Any = original) -> None:
            try:  # plots.check_pil_font falls back to PIL's default font on URLError only
                _orig(font, progress=progress)
            except Exception as e:  # noqa: BLE001
                raise URLError(str(e)) from e

        check_font._yolo_prune_patched = True  # type: ignore[attr-defined]
        general.check_font = check_font
        if plots is not None:
            plots.check_font = plots_check_font


# --------------------------------------------------------------------------------------------------
# Safe checkpoint loading
# --------------------------------------------------------------------------------------------------
def allowed_globals(backend: Backend) -> list[Any]:
    """The allow-list: YOLOv5's model classes under both spellings, the torch layers they use, numpy scalars.

    A class pickled as ``models.common.Conv`` (upstream-trained files) and one pickled as
    ``yolov5.models.common.Conv`` (PyPI-trained files) both load, and both resolve to the class of the YOLOv5
    in use, so YOLOv5's own ``isinstance`` checks (``fuse()``, ``Detect.export``) work on either kind of file.
    """
    import numpy as np

    entries: list[Any] = list(_TORCH_CLASSES)
    spellings = ("models.", "yolov5.models.")
    for rel in _MODEL_MODULES:
        own = importlib.import_module(backend.prefix + rel)
        leaf = rel.split(".", 1)[1]
        for name, obj in vars(own).items():
            # classes defined here, plus aliases such as models.yolo.Model = DetectionModel (v6.x files)
            if inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__ == own.__name__:
                entries += [(obj, f"{sp}{leaf}.{name}") for sp in spellings]
    # numpy scalars and arrays (best_fitness is a numpy array in checkpoints YOLOv5 writes); an object
    # array's elements are unpickled through the same allow-list
    core = getattr(np, "_core", None) or np.core
    entries += [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    entries += [getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Float16DType", "Int64DType",
                                                 "Int32DType", "BoolDType")
                if hasattr(np, "dtypes") and hasattr(np.dtypes, n)]
    # pathlib paths can appear in a checkpoint's 'opt'
    import pathlib

    entries += [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]
    return entries


def register_safe_globals(backend: Backend) -> None:
    """Allow-list YOLOv5/torch classes for every ``torch.load``, YOLOv5's own loads included."""
    torch.serialization.add_safe_globals(allowed_globals(backend))


def trust_all_checkpoints() -> bool:
    """True when the user opted out of the allow-list (``YOLO_PRUNE_TRUST_CHECKPOINTS=1``)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in {"1", "true", "yes"}


def enable_trusted_loading() -> None:
    """Opt-out: make every ``torch.load`` (YOLOv5's too) unpickle anything. For trusted files only."""
    os.environ[TRUST_ENV] = "1"
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"


def load_checkpoint(path: str | Path, backend: Optional[Backend] = None) -> dict:
    """Load a YOLOv5 detection checkpoint through the allow-list and check its shape.

    Raises :class:`CheckpointError` (or :class:`UnsafeCheckpointError`) with a one-line message naming
    the file and what was expected.
    """
    backend = backend or get_backend()
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such file (expected a YOLOv5 .pt checkpoint)")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a directory (expected a YOLOv5 .pt checkpoint file)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=not trust_all_checkpoints())
    except pickle.UnpicklingError as e:
        name = _unsupported_global(str(e))
        if name:
            raise UnsafeCheckpointError(
                f"{p}: refused to load: its pickle references {name}, which is not a YOLOv5/torch class on the "
                f"allow-list (nothing was executed). If you trust this file, set {TRUST_ENV}=1 or pass "
                "--trust-checkpoint") from None
        raise CheckpointError(f"{p}: corrupted, truncated or not a torch checkpoint ({_weights_only_reason(e)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{p}: corrupted, truncated or not a torch checkpoint ({_first_line(e)})") from None
    validate_checkpoint(ckpt, p)
    return ckpt


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0]}" if s else type(e).__name__


def _unsupported_global(msg: str) -> Optional[str]:
    import re

    m = re.search(r"GLOBAL ([\w.]+)", msg)
    return m.group(1) if m else None


def _weights_only_reason(e: BaseException) -> str:
    """The informative line of torch's long weights-only error (not its generic preamble)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation",
                                                       "(1)", "(2)", "In PyTorch", "Please file an issue"))]
    return (useful[0] if useful else _first_line(e))[:200]


def validate_checkpoint(ckpt: Any, path: Path | str) -> None:
    """Check that ``ckpt`` is a YOLOv5 detection checkpoint holding a model with Conv2d layers."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a YOLOv5 checkpoint (expected a dict with a 'model' entry, "
                              f"got {type(ckpt).__name__})")
    model = ckpt.get("ema") or ckpt.get("model")
    if model is None:
        keys = ", ".join(map(str, list(ckpt)[:6])) or "none"
        raise CheckpointError(f"{path}: not a YOLOv5 checkpoint (no 'model' or 'ema' entry; keys: {keys}); "
                              "a plain state_dict cannot be pruned, save the whole model as YOLOv5 does")
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{path}: not a YOLOv5 checkpoint ('model' is a {type(model).__name__}, "
                              "expected a YOLOv5 model)")
    if not is_detection_model(model):
        raise CheckpointError(f"{path}: not a YOLOv5 detection model ({type(model).__name__} has no Detect head)")


def is_detection_model(model: nn.Module) -> bool:
    """True for a YOLOv5 detection model, whichever package spelling its classes use."""
    inner = getattr(model, "model", None)
    return isinstance(inner, nn.Sequential) and len(inner) > 0 and type(inner[-1]).__name__ in {"Detect", "Segment"}


def class_name(module: nn.Module) -> str:
    """Class name of a module; spelling-agnostic stand-in for ``isinstance`` against YOLOv5 classes."""
    return type(module).__name__


def iter_modules_of(model: nn.Module, names: Iterable[str]):
    wanted = set(names)
    for n, m in model.named_modules():
        if class_name(m) in wanted:
            yield n, m


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
