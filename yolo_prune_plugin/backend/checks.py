"""Early checks of what the user asked for: files, device, class count. One-line :class:`ConfigError`/
:class:`CheckpointError` messages, raised before any heavy import (files) or any work (device, classes).

This module imports only the standard library at the top: :func:`check_user_paths` runs before YOLOv5 is
imported (the package itself imports torch), so a typo in ``--weights`` is reported before YOLOv5's import.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..errors import CheckpointError, ConfigError

# names YOLOv5 downloads from its release assets when not found locally (train/prune accept them as-is)
RELEASE_WEIGHTS = re.compile(r"^yolov5[nsmlx]6?(-seg|-cls)?\.pt$")


def _is_url(s: str) -> bool:
    return s.startswith(("http:/", "https:/"))


def check_weights_path(weights: Optional[str], flag: str = "--weights", allow_release: bool = False) -> None:
    """A ``--weights`` value must name an existing ``.pt`` file (or, for train, a YOLOv5 release name / URL)."""
    if not weights or _is_url(str(weights)):
        return
    p = Path(str(weights)).expanduser()
    if p.is_dir():
        raise CheckpointError(f"{p}: is a directory ({flag} expects a YOLOv5 .pt checkpoint file)")
    if p.is_file():
        return
    if allow_release and RELEASE_WEIGHTS.match(str(weights)):
        return  # YOLOv5 downloads its own release files
    raise CheckpointError(f"{p}: no such file ({flag} expects a YOLOv5 .pt checkpoint)")


def check_file_path(path: Optional[str], flag: str, what: str) -> None:
    """``flag``'s value must be an existing file (config YAML, data YAML)."""
    if path is None or _is_url(str(path)):
        return
    p = Path(str(path)).expanduser()
    if p.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory (expected {what})")
    if not p.is_file():
        raise ConfigError(f"{flag} {path}: {what} not found")


def check_user_paths(weights: Optional[str] = None, data: Optional[str] = None, config: Optional[str] = None,
                     allow_release: bool = False) -> None:
    """Check every path the user gave, before YOLOv5 is imported."""
    check_file_path(config, "--prune-config" if allow_release else "--config", "prune config YAML")
    check_weights_path(weights, allow_release=allow_release)
    check_file_path(data, "--data", "data YAML")


def available_devices() -> list[str]:
    """What this machine can run on, as ``--device`` values: ``cpu``, ``0``.. (CUDA), ``mps``."""
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out += [str(i) for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def check_device(device: Any, flag: str = "--device") -> None:
    """Raise :class:`ConfigError` when ``device`` (``''``, ``cpu``, ``mps``, ``0``, ``0,1``, ``cuda:0``) is not here.

    ``''`` (auto) is always fine. Runs before any epoch, pruning or evaluation, so a run asked for a GPU that
    is not there stops at once instead of after YOLOv5 has loaded everything (or silently using the CPU).
    """
    import torch

    if isinstance(device, torch.device):
        device = "cpu" if device.type == "cpu" else device.type if device.index is None else f"{device.type}:{device.index}"
    d = str(device if device is not None else "").strip().lower().replace("cuda:", "").replace(" ", "")
    if d in ("", "cpu"):
        return
    avail = ", ".join(available_devices())
    if d == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"{flag} {device}: Apple MPS is not available on this machine; available: {avail}")
        return
    if d == "cuda":
        d = "0"
    ids = [x for x in d.split(",") if x != ""]
    if not ids or not all(x.isdigit() for x in ids):
        raise ConfigError(f"{flag} {device}: expected cpu, mps or CUDA device ids such as 0 or 0,1; "
                          f"available: {avail}")
    if not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"{flag} {device}: CUDA is not available on this machine ({why}); available: {avail}")
    n = torch.cuda.device_count()
    bad = [x for x in ids if int(x) >= n]
    if bad:
        raise ConfigError(f"{flag} {device}: CUDA device {', '.join(bad)} does not exist ({n} GPU(s) visible); "
                          f"available: {avail}")


def _names_list(names: Any) -> Optional[list[str]]:
    if isinstance(names, Mapping):
        try:
            return [str(names[k]) for k in sorted(names, key=int)]
        except (TypeError, ValueError):
            return [str(v) for v in names.values()]
    if isinstance(names, Sequence) and not isinstance(names, str):
        return [str(n) for n in names]
    return None


def _short(names: Sequence[str], n: int = 4) -> str:
    s = ", ".join(names[:n])
    return s + (", ..." if len(names) > n else "")


def check_model_matches_data(model: Any, data: Mapping[str, Any], weights: Any, data_path: Any = None,
                             single_cls: bool = False) -> None:
    """Raise :class:`ConfigError` when the model's class count differs from the data YAML's ``nc``.

    Same count but other ``names``: a warning (classes are often renamed; metrics compare class ids).

    Evaluating a COCO model on a 4-class dataset gives meaningless mAP (or an IndexError deep in YOLOv5);
    this says which file has how many classes instead. ``single_cls`` evaluation accepts any class count.
    """
    if single_cls:
        return
    inner = getattr(model, "model", None)
    head = inner[-1] if inner is not None and hasattr(inner, "__getitem__") and len(inner) else None
    model_nc = getattr(model, "nc", None) or getattr(head, "nc", None)
    data_nc = data.get("nc")
    mnames, dnames = _names_list(getattr(model, "names", None)), _names_list(data.get("names"))
    where = data_path or "the data YAML"
    if model_nc is not None and data_nc is not None and int(model_nc) != int(data_nc):
        raise ConfigError(f"{weights}: the model has {int(model_nc)} classes"
                          f"{f' ({_short(mnames)})' if mnames else ''} but {where} has nc={int(data_nc)}"
                          f"{f' ({_short(dnames)})' if dnames else ''}; evaluate on the dataset the model was "
                          "trained on (or pass --single-cls)")
    if mnames and dnames and len(mnames) == len(dnames) and mnames != dnames:
        # same count, other names: evaluation works (ids are compared), but say so; renamed classes are common
        i = next(i for i, (a, b) in enumerate(zip(mnames, dnames)) if a != b)
        logging.getLogger("yolo_prune_plugin").warning(
            "yolo_prune_plugin: %s: class names differ from %s (class %d: model %r, data %r); metrics compare class "
            "ids, so check that the dataset is the one the model was trained on", weights, where, i, mnames[i],
            dnames[i])
