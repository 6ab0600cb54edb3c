"""Progress bars: drawn on a terminal only (``YOLO_PRUNE_PROGRESS=1`` forces them, ``0`` hides them)."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

LOGGER = logging.getLogger("yolo_prune_plugin")


#: ``1``: always show progress bars; ``0``: never; unset: on a terminal only.
PROGRESS_ENV = "YOLO_PRUNE_PROGRESS"


def progress(iterable: Optional[Iterable[Any]] = None, desc: str = "", total: Optional[int] = None,
             disable: Optional[bool] = None) -> Any:
    """A tqdm bar in YOLOv5's style (its ``TQDM_BAR_FORMAT`` when YOLOv5 is loaded), on stderr.

    ``disable=None`` (default) shows it only on a terminal, as tqdm does, so logs and CI output stay clean;
    ``YOLO_PRUNE_PROGRESS=1`` always shows it, ``=0`` never. Without tqdm, returns a stand-in with the same
    ``update``/``close``/iteration API.
    """
    import os
    import sys

    env = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if disable is None and env in ("0", "1", "true", "false", "yes", "no"):
        disable = env in ("0", "false", "no")

    fmt = None
    for name in ("yolov5.utils.general", "utils.general"):
        fmt = getattr(sys.modules.get(name), "TQDM_BAR_FORMAT", None) or fmt
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar(iterable)
    kwargs: dict[str, Any] = {"desc": desc, "total": total, "disable": disable, "file": sys.stderr,
                              "leave": False}
    if fmt:
        kwargs["bar_format"] = fmt
    return tqdm(iterable, **kwargs)


class _NoBar:
    def __init__(self, iterable: Optional[Iterable[Any]] = None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable or ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass
