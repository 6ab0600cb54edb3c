"""yolo_prune_plugin: prune YOLOv5 detectors to one global Conv2d sparsity when training ends.

Public API::

    from yolo_prune_plugin import register, train, prune, load_config

    callbacks = Callbacks()                      # YOLOv5's utils.callbacks.Callbacks
    register(callbacks, load_config(amount=0.3))  # prune best.pt when training ends
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import PruneConfig, load_config  # noqa: E402
from .errors import CheckpointError, ConfigError, PruneError, UnsafeCheckpointError  # noqa: E402


def __getattr__(name: str):  # lazy: importing the package must not import YOLOv5
    if name in ("register", "train", "prune", "PrunePlugin"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'yolo_prune_plugin' has no attribute {name!r}")


__all__ = ["__version__", "PruneConfig", "load_config", "register", "train", "prune", "PrunePlugin",
           "PruneError", "ConfigError", "CheckpointError", "UnsafeCheckpointError"]
