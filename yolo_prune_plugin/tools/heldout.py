"""Held-out evaluation: data YAMLs whose calibration (``train``) and evaluation (``val``) images are disjoint.

Accuracy of a data-aware pruner is only meaningful on images it never saw. Two ways to get such a YAML:

* :func:`split_data_yaml` - one image folder (e.g. coco128, whose ``train`` and ``val`` are the same folder)
  split deterministically: image files sorted by name, the first ``calibration`` files become the
  ``train:`` list (calibration pool), the last ``evaluation`` files the ``val:`` list. Both lists are
  written as text files of absolute paths beside an absolute data YAML.
* :func:`retarget_data_yaml` - a dataset that already has a held-out split (e.g. corn-pest ``test``):
  ``val:`` is pointed at that split, ``train:`` stays the calibration source.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from ..backend.data import image_files
from ..errors import ConfigError

LOGGER = logging.getLogger("yolo_prune_plugin")


def _load(src: Path) -> dict:
    d = yaml.safe_load(src.read_text(encoding="utf-8"))
    if not isinstance(d, dict):
        raise ConfigError(f"{src}: expected a YOLOv5 dataset mapping")
    return d


def _root(src: Path, d: dict) -> Path:
    root = Path(str(d.get("path") or "."))
    return root if root.is_absolute() else (src.parent / root).resolve()


def split_data_yaml(src: str | Path, dest_dir: str | Path, calibration: int = 64, evaluation: int = 64,
                    split: str = "val") -> Path:
    """Write ``dest_dir/<name>-heldout.yaml`` + ``calibration.txt`` / ``evaluation.txt`` from ``src``'s ``split``.

    Image files of ``split`` sorted by name: the first ``calibration`` go to ``train:`` (calibration pool),
    the last ``evaluation`` to ``val:``; raises :class:`ConfigError` when they would overlap.
    """
    src = Path(src).expanduser().resolve()
    d = _load(src)
    if split not in d:
        raise ConfigError(f"{src}: no {split!r} key to split")
    files = image_files(d[split], _root(src, d))
    if calibration < 1 or evaluation < 1 or calibration + evaluation > len(files):
        raise ConfigError(f"{src}: cannot split {len(files)} '{split}' images into {calibration} calibration + "
                          f"{evaluation} evaluation images without overlap")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    cal, ev = files[:calibration], files[len(files) - evaluation:]
    (dest / "calibration.txt").write_text("".join(f"{f}\n" for f in cal), encoding="utf-8")
    (dest / "evaluation.txt").write_text("".join(f"{f}\n" for f in ev), encoding="utf-8")
    out = {**d, "path": str(dest.resolve()), "train": str((dest / "calibration.txt").resolve()),
           "val": str((dest / "evaluation.txt").resolve())}
    out.pop("test", None)
    f = dest / f"{src.stem}-heldout.yaml"
    f.write_text(yaml.safe_dump(out, sort_keys=False), encoding="utf-8")
    return f


def retarget_data_yaml(src: str | Path, dest_dir: str | Path, evaluation: str = "test",
                       calibration: str = "train") -> Path:
    """Write ``dest_dir/<name>-<evaluation>.yaml``: absolute paths, ``train:`` = ``calibration`` split,
    ``val:`` = ``evaluation`` split of ``src``."""
    src = Path(src).expanduser().resolve()
    d = _load(src)
    for k in (calibration, evaluation):
        if not d.get(k):
            raise ConfigError(f"{src}: no {k!r} split")
    root = _root(src, d)
    absol = (lambda e: [str(root / x) for x in e] if isinstance(e, list) else str(root / str(e)))
    out = {**d, "path": str(root), "train": absol(d[calibration]), "val": absol(d[evaluation])}
    out.pop("test", None)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    f = dest / f"{src.stem}-{evaluation}.yaml"
    f.write_text(yaml.safe_dump(out, sort_keys=False), encoding="utf-8")
    return f
