"""Find YOLOv5 and load its checkpoints safely.

It finds YOLOv5 (the PyPI package ``yolov5`` importing as ``yolov5.*``, or an upstream ultralytics/yolov5
checkout importing as ``models.*``, ``utils.*``, ``train``, ``val``, ``export``) and loads checkpoints through
an allow-list of the YOLOv5/torch classes (numpy-1 pickles included) instead of turning ``torch.load``'s
``weights_only`` off. Everything else in the plugin talks to YOLOv5 through :func:`get_backend`.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import pickle
import re
import sys
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from ..errors import CheckpointError, PruneError, UnsafeCheckpointError

LOGGER = logging.getLogger("yolo_prune_plugin")


#: Environment variable naming an upstream ultralytics/yolov5 checkout to use instead of PyPI ``yolov5``.
YOLOV5_DIR_ENV = "YOLO_PRUNE_YOLOV5_DIR"


# Module paths (relative to the YOLOv5 root) whose nn.Module classes real checkpoints pickle.
_MODEL_MODULES = ("models.common", "models.yolo", "models.experimental")


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
        """YOLOv5's own ``attempt_load`` (takes ``ema`` before ``model``), with :func:`repair_compat` applied: PyPI
        yolov5 7.0.14's own repairs compare with ``models.yolo.Detect``, a class the loaded modules are not."""
        model = self.experimental.attempt_load(str(Path(weights).resolve()), device=device, fuse=fuse)
        repair_compat(model)
        return model


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
        register_safe_globals(_backend)  # process-wide, see PROCESS_WIDE
        return _backend


def backend_of_callbacks(callbacks: Any) -> Backend:
    """The backend that a YOLOv5 ``Callbacks`` instance belongs to (PyPI package, or the checkout it came from)."""
    module = type(callbacks).__module__
    if module.startswith("yolov5."):
        return get_backend()
    mod = sys.modules.get(module)
    if module == "utils.callbacks" and mod is not None and getattr(mod, "__file__", None):
        return get_backend(Path(mod.__file__).resolve().parents[1])
    return get_backend()


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
    with _on_sys_path(root):
        return _load_modules("checkout", root, "")


@contextlib.contextmanager
def _on_sys_path(root: Path | None) -> Iterator[None]:
    """``root`` first on ``sys.path`` while the block runs (a checkout imports itself as ``models``/``utils``)."""
    added = root is not None and str(root) not in sys.path
    if added:
        sys.path.insert(0, str(root))
    try:
        yield
    finally:
        if added and str(root) in sys.path:
            sys.path.remove(str(root))


def _load_modules(kind: str, root: Path, prefix: str) -> Backend:
    def imp(name: str) -> ModuleType:
        return importlib.import_module(prefix + name)

    # val/export/train import plots, which import the font check: import general first to patch it early.
    general = imp("utils.general")
    return Backend(kind=kind, root=root, prefix=prefix, general=general, callbacks=imp("utils.callbacks"),
                   experimental=imp("models.experimental"), yolo=imp("models.yolo"), val=imp("val"),
                   export=imp("export"), train=imp("train"))


#: Environment variable that, set to ``1``, loads checkpoints with ``weights_only=False`` (trusted files only).
TRUST_ENV = "YOLO_PRUNE_TRUST_CHECKPOINTS"


# torch classes YOLOv5 detection models are built from (models/common.py, models/yolo.py, experimental.py).
_TORCH_CLASSES: tuple[type, ...] = (
    nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish,
    nn.Sigmoid, nn.Identity, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Upsample, nn.Sequential, nn.ModuleList,
    nn.Linear, nn.Dropout, nn.Flatten, nn.LayerNorm, nn.MultiheadAttention,
    nn.modules.linear.NonDynamicallyQuantizableLinear,
)


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
    entries += numpy_globals()
    entries += [getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Float16DType", "Int64DType",
                                                 "Int32DType", "BoolDType")
                if hasattr(np, "dtypes") and hasattr(np.dtypes, n)]
    # pathlib paths can appear in a checkpoint's 'opt'
    import pathlib

    entries += [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]
    return entries


#: The numpy names checkpoints pickle, under numpy 1's (``numpy.core``) and numpy 2's (``numpy._core``)
#: spelling. Only array/scalar rebuilders and dtype classes: nothing that can call arbitrary code.
_NUMPY_REBUILDERS = ("multiarray._reconstruct", "multiarray.scalar")


def numpy_globals() -> list[Any]:
    """numpy's array/scalar rebuilders and ``ndarray``/``dtype`` under both module spellings.

    A file pickled under numpy 1 names ``numpy.core.multiarray._reconstruct``; one pickled under numpy 2 names
    ``numpy._core.multiarray._reconstruct``. Both map to the real objects of the numpy in use (``(obj, name)``
    entries of ``torch.serialization.add_safe_globals``), so either loads on either numpy.
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    entries: list[Any] = [np.ndarray, np.dtype]
    for rel in _NUMPY_REBUILDERS:
        mod, name = rel.split(".")
        obj = getattr(getattr(core, mod), name)
        entries.append(obj)
        entries += [(obj, f"{sp}.{rel}") for sp in ("numpy.core", "numpy._core")]
    entries += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    return entries


def register_safe_globals(backend: Backend) -> None:
    """Allow-list YOLOv5/torch classes for every ``torch.load``, YOLOv5's own loads included."""
    torch.serialization.add_safe_globals(allowed_globals(backend))


def trust_all_checkpoints() -> bool:
    """True when the user opted out of the allow-list (``YOLO_PRUNE_TRUST_CHECKPOINTS=1``)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in {"1", "true", "yes"}


@contextlib.contextmanager
def trusted_loading() -> Iterator[None]:
    """Opt-out, for this block: every ``torch.load`` (YOLOv5's too) unpickles anything. For trusted files only.
    The two environment variables are restored afterwards."""
    saved = {k: os.environ.get(k) for k in (TRUST_ENV, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ.update({TRUST_ENV: "1", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    # torch's unpickler fails on arbitrary bytes with whatever its parser hits (IndexError on b'text', ...)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError, IndexError, KeyError,
            TypeError) as e:
        raise CheckpointError(f"{p}: corrupted, truncated or not a torch checkpoint ({first_line(e)})") from None
    validate_checkpoint(ckpt, p)
    for key in ("model", "ema"):
        if isinstance(ckpt.get(key), nn.Module):
            repair_compat(ckpt[key])
    return ckpt


#: Activations whose ``inplace`` attribute files pickled before torch 1.7 lack (YOLOv5's ``attempt_load`` list).
_INPLACE_MODULES = (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU)


def repair_compat(model: nn.Module) -> int:
    """Apply YOLOv5 7.0's ``attempt_load`` compatibility repairs to a loaded model in place; returns how many
    modules changed.

    The repairs: a v6.0-v6.2 ``Detect.anchor_grid`` tensor (v7 expects a list, ``Detect._make_grid`` fails on
    the tensor) becomes v7's list of ``nl`` empty grids; a missing ``inplace`` (files of torch < 1.7) is added
    to activations, ``Detect`` and the model; a missing ``Upsample.recompute_scale_factor`` (torch < 1.11) is
    ``None``; a missing model ``stride`` is 32 and a list of ``names`` becomes a dict. Unlike ``attempt_load``
    an ``inplace`` the module already has is kept (``attempt_load`` forces True, which is for inference only).
    """
    changed = 0
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
        changed += 1
    if isinstance(getattr(model, "names", None), (list, tuple)):
        model.names = dict(enumerate(model.names))
        changed += 1
    for m in model.modules():
        fixed = False
        head = type(m).__name__ in {"Detect", "Segment"}
        if (head or m is model or isinstance(m, _INPLACE_MODULES)) and not hasattr(m, "inplace"):
            m.inplace = True
            fixed = True
        if head and not isinstance(m.anchor_grid, list):
            delattr(m, "anchor_grid")
            m.anchor_grid = [torch.empty(0) for _ in range(int(m.nl))]
            fixed = True
        if isinstance(m, nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None
            fixed = True
        changed += fixed
    return changed


def first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0]}" if s else type(e).__name__


def _unsupported_global(msg: str) -> Optional[str]:
    m = re.search(r"GLOBAL ([\w.]+)", msg)
    return m.group(1) if m else None


def _weights_only_reason(e: BaseException) -> str:
    """The informative line of torch's long weights-only error (not its generic preamble)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation",
                                                       "(1)", "(2)", "In PyTorch", "Please file an issue"))]
    return (useful[0] if useful else first_line(e))[:200]


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


def respell_trusted(model: nn.Module, backend: Backend) -> int:
    """Only for ``--trust-checkpoint`` loads (the allow-list already maps both spellings): point modules of the
    other YOLOv5 spelling (``models.*`` vs ``yolov5.models.*``, the same source imported twice) at the
    backend's classes of the same name. Returns the number of modules changed (0 without trusted loading)."""
    if not trust_all_checkpoints():
        return 0
    changed = 0
    for rel in _MODEL_MODULES:
        own = importlib.import_module(backend.prefix + rel)
        others = {"yolov5." + rel, rel} - {own.__name__}
        for m in model.modules():
            cls = type(m)
            if cls.__module__ in others:
                target = getattr(own, cls.__name__, None)
                if inspect.isclass(target) and issubclass(target, nn.Module) and target is not cls:
                    m.__class__ = target
                    changed += 1
    return changed
