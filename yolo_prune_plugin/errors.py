"""Exceptions the plugin raises for problems with what the user gave it.

Each is a one-line message that names the file, key or flag and what was expected; the CLI prints it
without a traceback and exits non-zero.
"""

from __future__ import annotations


class PruneError(Exception):
    """Base class for expected, user-facing errors."""


class ConfigError(PruneError, ValueError):
    """A configuration key, value or flag is invalid."""


class CheckpointError(PruneError):
    """A checkpoint file is missing, unreadable or not a YOLOv5 detection checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle references something outside the allow-list of YOLOv5/torch classes."""


class OutputExistsError(PruneError, FileExistsError):
    """An output file exists from a different configuration and overwriting was not allowed."""


class ExportError(PruneError):
    """An export failed, or an exported artefact did not keep the pruned zeros."""


class BudgetError(PruneError):
    """No evaluated amount meets the ``target`` budget (nothing was written)."""


class YOLOv5CallError(PruneError):
    """A call into YOLOv5 does not fit the installed YOLOv5's signature (a layout the plugin does not know)."""
