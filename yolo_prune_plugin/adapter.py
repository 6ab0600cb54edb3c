"""The one module that knows YOLOv5's quirks.

(Over 400 lines: every YOLOv5/torch/numpy/Pillow patch and its undo lives here, by design.)

It finds YOLOv5 (the PyPI package ``yolov5`` importing as ``yolov5.*``, or an upstream
ultralytics/yolov5 checkout importing as ``models.*``, ``utils.*``, ``train``, ``val``, ``export``),
makes 7.0.x work on today's torch/numpy/Pillow, and loads checkpoints through an allow-list of the
YOLOv5/torch classes instead of turning ``torch.load``'s ``weights_only`` off.

Everything else in the plugin talks to YOLOv5 through :func:`get_backend`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import logging
import os
import pickle
import re
import sys
import threading
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Mapping, Optional

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


# --------------------------------------------------------------------------------------------------
# Patches: each applied for a scope and undone at its end
# --------------------------------------------------------------------------------------------------
#: What stays changed for the whole process once the plugin is used (everything else is undone):
#: the torch.load allow-list (``torch.serialization.add_safe_globals`` has no removal; it only *allows* the
#: YOLOv5/torch/numpy classes listed by :func:`allowed_globals`, so YOLOv5's own checkpoint loads work), and
#: the modules YOLOv5 imports (``sys.modules``), including the top-level ``models`` that PyPI yolov5 itself
#: appends to ``sys.path`` on import.
PROCESS_WIDE = ("torch.serialization safe globals (allowed_globals)", "sys.modules entries of YOLOv5")


class Patch:
    """Set attributes on objects and put the old values back (attributes that did not exist are deleted)."""

    _MISSING = object()

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        self._undo.append((obj, name, obj.__dict__.get(name, self._MISSING) if isinstance(obj, type)
                           else getattr(obj, name, self._MISSING)))
        setattr(obj, name, value)

    def undo(self) -> None:
        while self._undo:
            obj, name, old = self._undo.pop()
            if old is self._MISSING:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass
            else:
                setattr(obj, name, old)


class _CompatScope:
    """Reentrant: the patches of :func:`compat_patches` are applied on the first enter, undone on the last exit."""

    def __init__(self) -> None:
        self.depth = 0
        self.patch: Optional[Patch] = None
        self.path: Optional[contextlib.ExitStack] = None
        self.lock = threading.RLock()


_compat = _CompatScope()


@contextlib.contextmanager
def compat_patches(backend: Backend) -> Iterator[None]:
    """Make YOLOv5 7.0.x run on torch >= 2.6, numpy >= 2.4, Pillow >= 10 and offline machines, for this block.

    numpy's removed ``trapz`` (YOLOv5's AP integration), Pillow's removed ``getsize`` (YOLOv5's plots), the
    offline font download (``check_font`` under both module spellings), and a checkout's folder on ``sys.path``.
    Everything is restored when the outermost block ends. Nested blocks share one application.
    """
    with _compat.lock:
        if _compat.depth == 0:
            p = Patch()
            stack = contextlib.ExitStack()
            try:
                stack.enter_context(_on_sys_path(backend.root if backend.kind == "checkout" else None))
                _patch_numpy(p)
                _patch_pillow(p)
                _patch_font_download(p, backend)
            except BaseException:
                p.undo()
                stack.close()
                raise
            _compat.patch, _compat.path = p, stack
        _compat.depth += 1
    try:
        yield
    finally:
        with _compat.lock:
            _compat.depth -= 1
            if _compat.depth == 0:
                assert _compat.patch is not None and _compat.path is not None
                _compat.patch.undo()
                _compat.path.close()
                _compat.patch = _compat.path = None


@contextlib.contextmanager
def driving_yolov5(backend: Backend) -> Iterator[None]:
    """Everything the plugin sets up while it runs YOLOv5's own code (training, validation, export), undone after:
    the compatibility patches and a quiet log (:func:`quiet_yolov5`)."""
    with compat_patches(backend), quiet_yolov5():
        yield


def compat_active() -> bool:
    return _compat.depth > 0


def _patch_numpy(p: Patch) -> None:
    import numpy as np

    if not hasattr(np, "trapz") and hasattr(np, "trapezoid"):  # removed in numpy 2.4; YOLOv5's AP uses it
        p.set(np, "trapz", np.trapezoid)


def _patch_pillow(p: Patch) -> None:
    """Pillow >= 10 removed ``getsize``; YOLOv5's plotting threads still call it."""
    from PIL import ImageFont

    def getsize(self: Any, text: str, *args: Any, **kwargs: Any) -> tuple[int, int]:
        left, top, right, bottom = self.getbbox(text, *args, **kwargs)
        return int(right), int(bottom)

    for cls in (ImageFont.FreeTypeFont, ImageFont.ImageFont, getattr(ImageFont, "TransposedFont", None)):
        if cls is not None and not hasattr(cls, "getsize") and hasattr(cls, "getbbox"):
            p.set(cls, "getsize", getsize)


def _patch_font_download(p: Patch, backend: Backend) -> None:
    """Offline, ``check_dataset`` dies trying to download Arial.ttf: make the font optional.

    Patched under every spelling already imported (a checkout's ``utils.general``, the package's
    ``yolov5.utils.general``), since YOLOv5's modules may reach either.
    """
    from urllib.error import URLError

    for prefix in dict.fromkeys((backend.prefix, "", "yolov5.")):
        general, plots = sys.modules.get(prefix + "utils.general"), sys.modules.get(prefix + "utils.plots")
        if general is None:
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

        p.set(general, "check_font", check_font)
        if plots is not None:
            p.set(plots, "check_font", plots_check_font)


@contextlib.contextmanager
def export_patches(backend: Backend) -> Iterator[list[str]]:
    """Scoped patches for YOLOv5's ``export.run``; yields the list its export-failure log lines are collected in.

    torch >= 2.9 makes ``torch.onnx.export`` default to the dynamo exporter (needs ``onnxscript``, ignores
    YOLOv5's opset/``dynamic_axes`` setup): the TorchScript-based exporter YOLOv5 was written for is selected.
    Trusted (non-allow-listed) loads of a file pickled under the other spelling are re-spelled
    (:func:`respell_trusted`) so that YOLOv5's ``isinstance`` checks fuse it and set ``Detect.export``.
    """
    exp = backend.export
    orig_load = exp.attempt_load
    orig_onnx_export = torch.onnx.export
    failures: list[str] = []

    def attempt_load(weights: Any, device: Any = None, inplace: bool = True, fuse: bool = True) -> nn.Module:
        model = orig_load(weights, device=device, inplace=inplace, fuse=False)
        respell_trusted(model, backend)
        if fuse and hasattr(model, "fuse") and any(hasattr(m, "bn") and hasattr(m, "conv") for m in model.modules()):
            model.fuse()
        return model

    def onnx_export(*args: Any, **kwargs: Any) -> Any:
        if "dynamo" in inspect.signature(orig_onnx_export).parameters:
            kwargs.setdefault("dynamo", False)
        return orig_onnx_export(*args, **kwargs)

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if "failure" in msg or "ERROR" in msg:
                failures.append(" ".join(re.sub(r"\x1b\[[0-9;]*m", "", msg).split()))

    handler = Collect(logging.INFO)
    yolo_logger = backend.general.LOGGER
    p = Patch()
    with _export_lock, compat_patches(backend):
        p.set(exp, "attempt_load", attempt_load)
        p.set(torch.onnx, "export", onnx_export)
        yolo_logger.addHandler(handler)
        try:
            yield failures
        finally:
            yolo_logger.removeHandler(handler)
            p.undo()


_export_lock = threading.Lock()


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


# --------------------------------------------------------------------------------------------------
# Training objects: read from YOLOv5's train() frame, nothing patched
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainingObjects:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: Any  # ModelEMA or None (DDP ranks > 0)
    start_epoch: int
    resumed: bool
    imgsz: Optional[int] = None  # train()'s checked image size


def training_objects(backend: Backend) -> TrainingObjects:
    """The live model, optimizer and EMA of the YOLOv5 ``train()`` whose callback is running now.

    Call from ``on_train_start`` (or later): ``train()`` has built them by then. Read from its frame's locals,
    so no YOLOv5 name is patched. Raises :class:`PruneError` when not called inside YOLOv5 7.0.x's ``train()``.
    """
    frame = inspect.currentframe()
    try:
        f = frame.f_back if frame is not None else None
        while f is not None:
            if f.f_code.co_name == "train" and "optimizer" in f.f_locals and "ema" in f.f_locals:
                loc = f.f_locals
                model = loc["model"]
                model = getattr(model, "module", model)  # DDP
                start = int(loc.get("start_epoch", 0))
                return TrainingObjects(model, loc["optimizer"], loc["ema"], start, bool(loc.get("resume")) or start > 0,
                                       loc.get("imgsz") if isinstance(loc.get("imgsz"), int) else None)
            f = f.f_back
    finally:
        del frame
    raise PruneError("could not find YOLOv5's train() objects (model, optimizer, EMA) from the callback; the "
                     "recovery modes need YOLOv5 7.0.x's train.py")


def replace_optimizer_params(optimizer: torch.optim.Optimizer, replaced: Mapping[int, torch.Tensor]) -> int:
    """Swap stale parameters in YOLOv5's optimizer for the tensors that replaced them; returns how many.

    ``replaced``: ``id(old parameter) -> new parameter`` (Torch-Pruning assigns a new ``nn.Parameter`` to every
    pruned ``weight``/``bias``). ``smart_optimizer`` builds three param groups (0: biases, 1: Conv weights with
    weight decay, 2: BatchNorm weights without); each new tensor takes the old one's place in its group, so its lr,
    momentum and decay stay YOLOv5's. The old tensor's optimizer state (SGD momentum buffer, Adam moments) is
    dropped: its shape changed, the next step starts it afresh. Other parameters keep their state.
    """
    n = 0
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            new = replaced.get(id(p))
            if new is not None:
                optimizer.state.pop(p, None)
                params[i] = new
                n += 1
    return n


# --------------------------------------------------------------------------------------------------
# A quiet log while the plugin drives YOLOv5
# --------------------------------------------------------------------------------------------------
#: The deprecation warnings YOLOv5 7.0.x's training loop triggers (``torch.cuda.amp.autocast`` every batch,
#: ``torch.cuda.amp.GradScaler`` once); matched against the start of the message, FutureWarning only.
AMP_DEPRECATION = re.compile(r"`torch\.cuda\.amp\.(autocast|GradScaler|custom_fwd|custom_bwd)\(args\.\.\.\)` is deprecated")
#: YOLOv5's ``check_font`` log line (it tries to download Arial.ttf, which fails offline and is not needed).
FONT_DOWNLOAD = re.compile(r"Downloading https://ultralytics\.com/assets/\S+\.ttf")
_YOLOV5_LOGGER = "yolov5"  # utils.general.LOGGING_NAME, for the package and a checkout alike

_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_filter: Optional[tuple] = None


class _FontDownloadFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not FONT_DOWNLOAD.match(str(record.getMessage()))


_font_filter = _FontDownloadFilter()


@contextmanager
def quiet_yolov5() -> Iterator[None]:
    """Silence exactly YOLOv5's ``torch.cuda.amp`` FutureWarnings and its Arial.ttf download line, then restore.

    ``warnings.catch_warnings`` swaps the process-wide filter list (not thread-safe: a thread that adds a filter
    meanwhile loses it), so one filter entry is inserted and later removed by identity; re-entrant (nested or
    concurrent uses share the entry, the last exit removes it). Every other warning and log line is untouched.
    """
    global _quiet_depth, _quiet_filter
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_filter = ("ignore", AMP_DEPRECATION, FutureWarning, None, 0)
            warnings.filters.insert(0, _quiet_filter)
            warnings._filters_mutated()  # type: ignore[attr-defined]  # invalidate the once-per-location caches
            logging.getLogger(_YOLOV5_LOGGER).addFilter(_font_filter)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                for i, f in enumerate(warnings.filters):
                    if f is _quiet_filter:
                        del warnings.filters[i]
                        break
                warnings._filters_mutated()  # type: ignore[attr-defined]
                logging.getLogger(_YOLOV5_LOGGER).removeFilter(_font_filter)
                _quiet_filter = None


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
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{p}: corrupted, truncated or not a torch checkpoint ({_first_line(e)})") from None
    validate_checkpoint(ckpt, p)
    return ckpt


def _first_line(e: BaseException) -> str:
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


# --------------------------------------------------------------------------------------------------
# Channel-pruned checkpoints in YOLOv5's train.py (structured pruning)
# --------------------------------------------------------------------------------------------------
def _conv_shapes(model: nn.Module) -> dict[str, tuple]:
    det = model.model[-1] if is_detection_model(model) else None
    skip = {id(m) for m in getattr(det, "m", [])}  # Detect's outputs depend on nc/anchors, not on pruning
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and id(m) not in skip}


def is_channel_pruned(model: nn.Module, backend: Optional[Backend] = None) -> bool:
    """True when ``model``'s Conv2d shapes differ from what ``Model(model.yaml)`` builds (channels removed).

    A model without a ``yaml`` dict cannot be compared and counts as not pruned.
    """
    yaml_cfg = getattr(model, "yaml", None)
    if not isinstance(yaml_cfg, dict):
        return False
    b = backend or get_backend()
    ylog = b.general.LOGGER
    level = ylog.level
    ylog.setLevel(logging.WARNING)  # Model() prints its layer table
    try:
        ref = b.yolo.Model(copy.deepcopy(yaml_cfg), ch=3, nc=yaml_cfg.get("nc"))
    finally:
        ylog.setLevel(level)
    return _conv_shapes(ref) != _conv_shapes(model)


@contextlib.contextmanager
def keep_checkpoint_architecture(backend: Backend, weights: str | Path) -> Iterator[nn.Module]:
    """Make YOLOv5's ``train.py`` train the architecture stored in ``weights`` instead of rebuilding its YAML.

    ``train.py`` builds ``Model(cfg or ckpt['model'].yaml)`` and copies only tensors of equal shape
    (``intersect_dicts``): a channel-pruned checkpoint would be silently re-initialised at full width. Inside
    this context ``backend.train.Model`` returns an fp32 copy of the checkpoint's own module (all parameters
    trainable); ``nc`` must match the checkpoint's and custom ``anchors`` are refused (PruneError). The original
    ``Model`` is restored on exit, also on exceptions. Yields the checkpoint model (not the copy).
    """
    src = load_checkpoint(weights, backend)["model"]
    det = src.model[-1]
    wpath = Path(weights)

    def factory(cfg: Any = None, ch: int = 3, nc: Any = None, anchors: Any = None) -> nn.Module:
        if nc is not None and int(nc) != int(det.nc):
            raise PruneError(f"{wpath}: channel-pruned checkpoint has {det.nc} classes but the dataset {nc}; a "
                             "pruned architecture cannot change its class count (prune a model trained on this data)")
        if anchors:
            raise PruneError(f"{wpath}: channel-pruned checkpoint keeps its anchors; remove 'anchors' from hyp")
        if ch != 3:
            raise PruneError(f"{wpath}: channel-pruned checkpoint takes 3 input channels, not {ch}")
        m = copy.deepcopy(src).float()
        for p in m.parameters():
            p.requires_grad_(True)
        LOGGER.info("yolo_prune_plugin: training the channel-pruned architecture of %s (not its YAML)", wpath.name)
        return m

    p = Patch()
    p.set(backend.train, "Model", factory)
    try:
        yield src
    finally:
        p.undo()


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
