"""Calls into YOLOv5 whose signatures differ between the two layouts, matched by signature.

PyPI ``yolov5`` 7.0.14 and a current upstream ultralytics/yolov5 checkout drift apart: 7.0.14's
``LoadImagesAndLabels`` takes ``workers=``, the upstream one does not (it takes ``rank=`` and ``seed=``); 7.0.14's
``val.run`` and ``export.run`` accept aliases (``batch``, ``img``) upstream dropped, upstream's ``export.run`` has
options 7.0.14 lacks. Every such call goes through :func:`call`: keyword arguments that only some layouts take
(:data:`LAYOUT_KWARGS`) are passed where the callee's signature names them and left out where it does not; every
other keyword is passed as it is, so a real mistake still fails. A failure of the callee is re-raised as
:class:`~yolo_prune_plugin.errors.YOLOv5CallError` naming the YOLOv5 function and what it raised.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable, Mapping, Optional

from ..errors import YOLOv5CallError
from .loading import Backend, get_backend

LOGGER = logging.getLogger("yolo_prune_plugin")

#: Keyword arguments that one YOLOv5 layout takes and another does not (left out where the callee lacks them).
LAYOUT_KWARGS = frozenset({"workers", "rank", "seed", "min_items", "per_tensor", "cache", "mlmodel"})


@functools.lru_cache(maxsize=None)
def _accepted(fn: Callable) -> tuple[frozenset, bool]:
    """The keyword names ``fn`` takes, and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read: pass everything
        return frozenset(), True
    names = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def supported_kwargs(fn: Callable, kwargs: Mapping[str, Any]) -> dict:
    """``kwargs`` less the layout-specific ones (:data:`LAYOUT_KWARGS`) that ``fn``'s signature does not name."""
    names, var_kw = _accepted(fn)
    return {k: v for k, v in kwargs.items() if var_kw or k in names or k not in LAYOUT_KWARGS}


def call_name(fn: Callable) -> str:
    """``module.qualname`` of a YOLOv5 function or class, for messages."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', getattr(fn, '__name__', repr(fn)))}"


def call(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with the layout-specific keywords ``fn`` does not take left out.

    A ``TypeError`` from the call itself (a keyword neither layout knows) becomes :class:`YOLOv5CallError`
    naming ``fn`` and the installed YOLOv5; any other exception of ``fn`` propagates unchanged for the caller to
    word (an empty split, a missing file)."""
    kw = supported_kwargs(fn, kwargs)
    try:
        inspect.signature(fn).bind(*args, **kw)
    except TypeError as e:
        raise YOLOv5CallError(f"{call_name(fn)} does not take these arguments in the installed YOLOv5 ({e}); "
                              "the plugin supports PyPI yolov5 7.0.14 and current ultralytics/yolov5 "
                              "checkouts") from None
    except ValueError:  # no signature to check against
        pass
    return fn(*args, **kw)


def load_images_and_labels(path: Any, imgsz: int, batch_size: int = 1, stride: int = 32, prefix: str = "",
                           backend: Optional[Backend] = None) -> Any:
    """YOLOv5's ``LoadImagesAndLabels`` for plain (no augmentation, square letterbox) reading of ``path``, in
    this process (no workers), on either layout."""
    b = backend or get_backend()
    dataloaders = __import__(b.prefix + "utils.dataloaders", fromlist=["LoadImagesAndLabels"])
    return call(dataloaders.LoadImagesAndLabels, path, imgsz, batch_size=max(1, int(batch_size)), augment=False,
                rect=False, stride=stride, pad=0.0, prefix=prefix, workers=0, rank=-1, seed=0)


def create_dataloader(path: Any, imgsz: int, batch_size: int, stride: int, backend: Optional[Backend] = None,
                      **kwargs: Any) -> Any:
    """YOLOv5's ``create_dataloader(...)[0]`` on either layout."""
    b = backend or get_backend()
    dataloaders = __import__(b.prefix + "utils.dataloaders", fromlist=["create_dataloader"])
    return call(dataloaders.create_dataloader, path, imgsz, batch_size, stride, **kwargs)[0]


def val_run(backend: Backend, data: Any, **kwargs: Any) -> Any:
    """YOLOv5's ``val.run(data, **kwargs)`` on either layout."""
    return call(backend.val.run, data, **kwargs)


def export_run(backend: Backend, **kwargs: Any) -> Any:
    """YOLOv5's ``export.run(**kwargs)`` on either layout."""
    return call(backend.export.run, **kwargs)


__all__ = ["LAYOUT_KWARGS", "call", "supported_kwargs", "load_images_and_labels", "create_dataloader", "val_run",
           "export_run"]
