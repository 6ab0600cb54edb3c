"""yolo_prune_plugin: prune YOLOv5 detectors to one global Conv2d sparsity when training ends.

Public API::

    from yolo_prune_plugin import register, train, prune, load_config

    callbacks = Callbacks()                      # YOLOv5's utils.callbacks.Callbacks
    register(callbacks, load_config(amount=0.3))  # prune best.pt when training ends
"""

from __future__ import annotations

from ._version import __version__
from .api import prune, train
from .callbacks import PrunePlugin, register
from .config import PruneConfig, load_config
from .errors import CheckpointError, ConfigError, PruneError, UnsafeCheckpointError

__all__ = ["__version__", "PruneConfig", "load_config", "register", "train", "prune", "PrunePlugin",
           "PruneError", "ConfigError", "CheckpointError", "UnsafeCheckpointError"]
