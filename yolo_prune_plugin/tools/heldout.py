"""Held-out evaluation: data YAMLs whose calibration (``train``) and evaluation (``val``) images are disjoint.

Accuracy of a data-aware pruner is only meaningful on images it never saw. Two ways to get such a YAML:

* :func:`split_data_yaml` - one image folder (e.g. coco128, whose ``train`` and ``val`` are the same folder)
  split deterministically: image files sorted by name, the first ``calibration`` files become the
  ``train:`` list (calibration pool), the last ``evaluation`` files the ``val:`` list. Both lists are
  written as text files of absolute paths beside an absolute data YAML.
* :func:`retarget_data_yaml` - a dataset that already has a held-out split (e.g. corn-pest ``test``):
  ``val:`` is pointed at that split, ``train:`` stays the calibration source.

When they overlap anyway (coco128 as shipped, many users' YAMLs), :func:`overlap_plan` decides what each
data-aware step of a config does (docs/overlap.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import yaml

from ..backend.data import image_files
from ..config import DATA_AWARE_METHODS, PruneConfig
from ..errors import ConfigError
from ..prune.registry import DATA_AWARE_CHANNEL_IMPORTANCES, ChannelOptions

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


def calibration_needs(config: PruneConfig) -> list[str]:
    """Why ``config`` needs train-split images (empty: it does not)."""
    why = []
    if config.structure == "unstructured" and config.method in DATA_AWARE_METHODS:
        why.append(f"method {config.method!r}")
    if config.structure == "channel":
        why += channel_data_needs(config)
    if config.bn_recalibration.count(config.structure):
        why.append(f"bn_recalibration ({config.bn_recalibration.count(config.structure)} images; 0 turns it off)")
    return why


def channel_data_needs(config: PruneConfig, ch: Optional[ChannelOptions] = None) -> list[str]:
    """The ``channel.*`` options of ``config`` (or ``ch``, resolved) that need train-split images (data-dependent
    defaults do not)."""
    ch = ch or config.channel
    return [w for w, on in ((f"channel.importance {ch.importance!r}", ch.importance in DATA_AWARE_CHANNEL_IMPORTANCES),
                            ("channel.allocation 'sensitivity'", ch.allocation == "sensitivity"),
                            ("channel.reconstruct", ch.reconstruct), ("channel.compensate", ch.compensate)) if on]


def overlap_plan(config: PruneConfig, data: Any) -> dict[str, str]:
    """What the data-aware steps of ``config`` do because ``data``'s train (calibration) and val (evaluation) images
    overlap (docs/overlap.md), logged: ``{"overlap": why, step: what it does instead}``; empty when they are
    disjoint, with ``calibration.allow_overlap``, in schedule mode or without data-aware steps.

    BatchNorm recalibration runs anyway (its statistics are what training computed on those images); the default
    channel importance falls back from Taylor to L1, as ``method: auto`` falls back from obs to global. An explicit
    choice that fits the evaluation images (``method: obs``, ``channel.importance: taylor``, a sweep with a
    data-aware method) raises :class:`ConfigError` naming the key and the fix.
    """
    from ..prune.calibration import find_overlap

    sweep = [m for m in config.sweep.methods if m in DATA_AWARE_METHODS] if config.sweep.amounts else []
    if (data is None or config.calibration.allow_overlap or config.schedule.final_amount is not None
            or not (calibration_needs(config) or sweep)):
        return {}
    why = find_overlap(data)
    if not why:
        return {}
    explicit = ([f"method: {config.method}"] if config.structure == "unstructured" and config.method in
                DATA_AWARE_METHODS else [])
    ch = config.channel
    if config.structure == "channel":  # choices that pick channels or fit weights to the calibration images
        explicit += [f"channel.{k}: {v}" for k, v, on in (
            ("importance", ch.importance, ch.importance in DATA_AWARE_CHANNEL_IMPORTANCES),
            ("allocation", ch.allocation, ch.allocation == "sensitivity"),
            ("reconstruct", "true", bool(ch.reconstruct))) if on]
    explicit += [f"sweep.methods: {m}" for m in sweep]
    if explicit:
        raise ConfigError(f"{explicit[0]} fits the pruned model to its calibration images, and {why}: set "
                          "calibration.allow_overlap: true or use a data YAML with disjoint train and val splits")
    plan = {"overlap": why}
    if config.structure == "channel" and config.channel.importance is None:
        plan["channel.importance"] = ("l1 instead of taylor: Taylor ranking fits the labels of the images the "
                                      "result is measured on (set calibration.allow_overlap: true to use it)")
    if config.structure == "channel" and config.channel.allocation is None:
        plan["channel.allocation"] = ("global instead of sensitivity: the measured error would be measured on the "
                                      "images the result is evaluated on (set calibration.allow_overlap: true to "
                                      "use it)")
    if config.structure == "channel" and config.channel.reconstruct is None:
        plan["channel.reconstruct"] = ("off (BatchNorm recalibration instead): the least-squares refit fits the kept "
                                       "weights to the images the result is measured on (set "
                                       "calibration.allow_overlap: true to use it)")
    if config.structure == "channel" and config.channel.compensate:
        plan["channel.compensate"] = ("on the train images anyway: it moves removed channels' mean activations into "
                                      "the next bias, a statistic like BatchNorm's (no label is read)")
    if config.bn_recalibration.count(config.structure):
        plan["bn_recalibration"] = ("on the train images anyway: BatchNorm statistics from them are what training "
                                    "itself computed (no label is read, no weight is fitted)")
    for step, what in plan.items():
        if step != "overlap":
            LOGGER.warning("yolo_prune_plugin: %s: %s (%s)", step, what, why)
    return plan
