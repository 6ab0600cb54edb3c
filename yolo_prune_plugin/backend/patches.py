"""Process patches that make YOLOv5 7.0.x work on today's torch/numpy/Pillow, each paired with its undo.

Every patch is applied inside a context (:func:`compat_patches`, :func:`driving_yolov5`,
:func:`export_patches`, :func:`quiet_yolov5`, :func:`muted_yolov5`) and undone when it exits, so the plugin
leaves the process as it found it. Only ``backend/`` patches YOLOv5 (a test checks it).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import sys
import threading
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from .loading import Backend, _on_sys_path, repair_compat, respell_trusted

LOGGER = logging.getLogger("yolo_prune_plugin")


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


@contextlib.contextmanager
def replaced(obj: Any, name: str, value: Any) -> Iterator[None]:
    """``obj.name`` is ``value`` while the block runs, and what it was again afterwards (also on exceptions)."""
    p = Patch()
    p.set(obj, name, value)
    try:
        yield
    finally:
        p.undo()


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
    """Scoped patches for YOLOv5's ``export.run``; yields the list its failure log lines are collected in.

    The export runs quietly (:func:`muted_yolov5`): YOLOv5's banner ("Export complete", "Detect: ... --weights
    <file>", "Visualize: https://netron.app") names the plugin's temporary files, so its INFO lines are not shown;
    its "export failure" lines, warnings and errors are collected in the yielded list for the caller's message.
    torch >= 2.9 makes ``torch.onnx.export`` default to the dynamo exporter (needs ``onnxscript``, ignores
    YOLOv5's opset/``dynamic_axes`` setup): the TorchScript-based exporter YOLOv5 was written for is selected.
    Trusted (non-allow-listed) loads of a file pickled under the other spelling are re-spelled
    (:func:`respell_trusted`) so that YOLOv5's ``isinstance`` checks fuse it and set ``Detect.export``.
    """
    exp = backend.export
    orig_load = exp.attempt_load
    orig_onnx_export = torch.onnx.export

    def attempt_load(weights: Any, device: Any = None, inplace: bool = True, fuse: bool = True) -> nn.Module:
        model = orig_load(weights, device=device, inplace=inplace, fuse=False)
        respell_trusted(model, backend)
        repair_compat(model)  # PyPI yolov5's own repair compares classes of the other spelling: a no-op there
        if fuse and hasattr(model, "fuse") and any(hasattr(m, "bn") and hasattr(m, "conv") for m in model.modules()):
            model.fuse()
        return model

    def onnx_export(*args: Any, **kwargs: Any) -> Any:
        if "dynamo" in inspect.signature(orig_onnx_export).parameters:
            kwargs.setdefault("dynamo", False)
        return orig_onnx_export(*args, **kwargs)

    p = Patch()
    with _export_lock, compat_patches(backend), muted_yolov5(backend) as failures:
        p.set(exp, "attempt_load", attempt_load)
        p.set(torch.onnx, "export", onnx_export)
        try:
            yield failures
        finally:
            p.undo()


_export_lock = threading.Lock()


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
# YOLOv5's own output muted while the plugin runs it for itself (exports, budget probes)
# --------------------------------------------------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _MuteScope(logging.Filter):
    """The state of :func:`muted_yolov5`: installed as a filter on YOLOv5's logger while any block is open.

    Only the threads inside a block are muted (a training or validation in another thread keeps its log): their
    INFO records are dropped, their warnings and errors pass, and those with "failure" lines are collected in
    the lists of the thread's open blocks. The ``tqdm`` of YOLOv5's ``val`` and ``utils.dataloaders`` (the
    validation and label-scanning bars) is wrapped the same way: disabled for them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.threads: dict[int, list[list[str]]] = {}  # thread id -> the collecting lists of its open blocks
        self.loggers: list[logging.Logger] = []
        self.patch = Patch()
        self.patched: list[Any] = []  # the modules whose tqdm is wrapped

    def filter(self, record: logging.LogRecord) -> bool:
        lists = self.threads.get(threading.get_ident())  # a logger's filters run in the logging thread
        if not lists:
            return True
        msg = str(record.getMessage())
        if record.levelno >= logging.WARNING or "failure" in msg or "ERROR" in msg:
            line = " ".join(_ANSI.sub("", msg).split())
            for lines in lists:
                lines.append(line)
        return record.levelno >= logging.WARNING

    def muted(self) -> bool:
        return threading.get_ident() in self.threads


_mute = _MuteScope()


def _muted_tqdm(orig: Any) -> Any:
    def tqdm(*args: Any, **kwargs: Any) -> Any:
        if _mute.muted():
            kwargs["disable"] = True
        return orig(*args, **kwargs)

    return tqdm


@contextmanager
def muted_yolov5(backend: Backend) -> Iterator[list[str]]:
    """YOLOv5's INFO log lines (its logger, named by ``utils.general.LOGGING_NAME``) and its validation and
    label-scanning progress bars are not shown while this thread runs the block; warnings and errors still are.
    Yields a list that collects the plain text of the warnings, errors and "failure" lines logged meanwhile
    (export failures are INFO).

    For YOLOv5 work whose output would only name the plugin's temporary files (exports into a temporary folder,
    the budget search's probes). Re-entrant and thread-aware; the filter and the ``val.tqdm`` wrapper are removed
    when the last block of any thread ends.
    """
    me = threading.get_ident()
    lines: list[str] = []
    logger = logging.getLogger(getattr(backend.general, "LOGGING_NAME", _YOLOV5_LOGGER))
    bars = (getattr(backend, "val", None), sys.modules.get(backend.prefix + "utils.dataloaders"))
    with _mute.lock:
        if logger not in _mute.loggers:
            logger.addFilter(_mute)
            _mute.loggers.append(logger)
        for mod in bars:
            if mod is not None and hasattr(mod, "tqdm") and not any(m is mod for m in _mute.patched):
                _mute.patch.set(mod, "tqdm", _muted_tqdm(mod.tqdm))
                _mute.patched.append(mod)
        _mute.threads.setdefault(me, []).append(lines)
    try:
        yield lines
    finally:
        with _mute.lock:
            mine = _mute.threads[me]
            del mine[next(i for i in range(len(mine) - 1, -1, -1) if mine[i] is lines)]
            if not mine:
                del _mute.threads[me]
            if not _mute.threads:
                for lg in _mute.loggers:
                    lg.removeFilter(_mute)
                _mute.loggers.clear()
                _mute.patch.undo()
                _mute.patched.clear()
