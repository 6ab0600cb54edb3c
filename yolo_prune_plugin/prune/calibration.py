"""Calibration images for the data-aware pruning methods.

A few images from the data YAML's TRAIN split (never val), letterboxed to a square ``imgsz`` exactly as
YOLOv5's own dataset class does for non-augmented, non-rectangular loading.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Mapping, Union

import torch
import torch.nn as nn

from ..backend.loading import get_backend
from ..backend.patches import driving_yolov5
from ..errors import ConfigError, PruneError

LOGGER = logging.getLogger("yolo_prune_plugin")

DataSpec = Union[str, Path, Mapping[str, Any]]


def _split(data: DataSpec, key: str) -> tuple[Any, str]:
    """The (absolute) ``key`` split of ``data`` (``None`` when absent) and a name for messages."""
    if not isinstance(data, Mapping):
        p = Path(data).expanduser().resolve()
        b = get_backend()
        try:
            with driving_yolov5(b):  # check_dataset downloads a font: optional offline
                data = {**b.general.check_dataset(str(p), autodownload=False), "yaml_file": str(p)}
        except Exception:  # noqa: BLE001 - reported with its own message by _train_split
            return None, str(p)
    if not data.get(key):
        return None, str(data.get("yaml_file") or "data dict")
    return _train_split({**data, "train": data[key]})


def check_disjoint(data: DataSpec, calibration_split: str = "train", evaluation_split: str = "val") -> None:
    """Raise :class:`ConfigError` when the calibration split's image files overlap the evaluation split's.

    Files are compared by resolved path (folders are listed, ``.txt`` lists read). A missing evaluation
    split is not an overlap.
    """
    from ..backend.data import image_files

    cal, where = _split(data, calibration_split)
    ev, _ = _split(data, evaluation_split)
    if cal is None or ev is None:
        return
    try:
        shared = set(image_files(cal)) & set(image_files(ev))
    except ConfigError:
        return  # unreadable entries are reported by YOLOv5's dataset loader with their own message
    if shared:
        first = sorted(shared)[0]
        raise ConfigError(
            f"{where}: calibration split '{calibration_split}' and evaluation split '{evaluation_split}' share "
            f"{len(shared)} image file(s) (e.g. {first}); accuracy measured on images the pruner calibrated on "
            "is optimistic. Use disjoint splits (yolo_prune_plugin.tools.heldout.split_data_yaml writes one) or set "
            "calibration.allow_overlap: true to accept it knowingly")


def find_overlap(data: DataSpec) -> str:
    """Why ``data``'s calibration (train) and evaluation (val) images overlap, in one line; empty when they are
    disjoint (or when that cannot be told: a missing split, an unreadable entry)."""
    try:
        check_disjoint(data)
    except ConfigError as e:
        return str(e).split(";")[0]
    return ""


def _train_split(data: DataSpec) -> tuple[Any, str]:
    """The (absolute) train split of ``data`` and a name for messages."""
    b = get_backend()
    if isinstance(data, Mapping):
        where = str(data.get("yaml_file") or "data dict")
        d = data
        if "train" not in d:
            raise ConfigError(f"{where}: no 'train' key (calibration images come from the training split)")
        root = Path(str(d.get("path") or ""))
        train = d["train"]
        # check_dataset makes the splits absolute; keep a plain dict usable too
        resolve = (lambda t: str(Path(t) if Path(t).is_absolute() else (root / t).resolve()))
        train = [resolve(t) for t in train] if isinstance(train, (list, tuple)) else resolve(train)
        return train, where
    p = Path(data).expanduser().resolve()
    if not p.is_file():
        raise ConfigError(f"{p}: data YAML not found (expected a YOLOv5 dataset YAML with a 'train' split)")
    try:
        with driving_yolov5(b):  # check_dataset downloads a font: optional offline
            d = b.general.check_dataset(str(p), autodownload=False)
    except Exception as e:  # noqa: BLE001 - YOLOv5 raises bare Exception/AssertionError here
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{p}: not a usable YOLOv5 dataset YAML ({msg})") from None
    return d["train"], str(p)


def _train_dataset(train: Any, where: str, imgsz: int, batch_size: int) -> Any:
    """YOLOv5's dataset of the train split (either YOLOv5 layout); ConfigError naming the split when YOLOv5 finds
    no images there or cannot read it (with what YOLOv5 said); a call the installed YOLOv5 does not take is
    YOLOv5CallError, never blamed on the images."""
    from ..backend.calls import load_images_and_labels

    try:
        dataset = load_images_and_labels(train, imgsz, batch_size=batch_size, stride=32, prefix="calibration: ")
    except PruneError:
        raise
    except Exception as e:  # noqa: BLE001 - "No images found" / "does not exist" are bare Exceptions in YOLOv5
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"{where}: YOLOv5 could not read the train split {train} for calibration "
                          f"({type(e).__name__}: {msg})") from None
    if len(dataset) == 0:
        raise ConfigError(f"{where}: train split {train} has no images for calibration")
    return dataset


def load_calibration_images(data: DataSpec, imgsz: int, n: int = 16, batch_size: int = 8, seed: int = 0,
                            device: Any = "cpu", allow_overlap: bool = False) -> torch.Tensor:
    """``n`` training images as a float tensor ``(N, 3, imgsz, imgsz)`` in [0, 1] on ``device``.

    ``data`` is a data YAML path or the dict returned by YOLOv5's ``check_dataset``. Images are drawn
    without replacement from the train split by a seeded permutation (same seed, same images) and are
    letterboxed by YOLOv5's ``LoadImagesAndLabels`` (``augment=False, rect=False``). ``N = min(n, images in
    the split)``. ``batch_size`` is passed on to YOLOv5's dataset and does not change the result. Raises
    :class:`ConfigError` naming the file when the train split is missing or holds no images, and (unless
    ``allow_overlap``) when a train image is also a val image (:func:`check_disjoint`): calibration never
    reads evaluation images.
    """
    if n < 1:
        raise ConfigError(f"calibration.images must be >= 1, got {n}")
    train, where = _train_split(data)
    if not allow_overlap:
        check_disjoint(data)
    b = get_backend()
    stride = 32
    imgsz = int(b.general.check_img_size(imgsz, stride))
    dataset = _train_dataset(train, where, imgsz, batch_size)
    total = len(dataset)
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(total, generator=g)[: min(n, total)].tolist()
    out = torch.empty((len(order), 3, imgsz, imgsz), dtype=torch.float32)
    for j, i in enumerate(order):
        im = dataset[i][0]  # uint8 CHW RGB, letterboxed to (imgsz, imgsz)
        out[j] = im.float() / 255.0
    LOGGER.info(f"calibration: {len(order)} images from {train} at {imgsz}")
    return out.to(device)


def resolve_method(method: str, data: DataSpec | None, images: int = 16,
                   allow_overlap: bool = False) -> tuple[str, str]:
    """The method a run prunes with, and why (empty when ``method`` is not ``auto``).

    ``auto`` (the config default) becomes ``obs`` when ``data`` has a train split that shares no image with its
    val split (or ``allow_overlap``), else ``global``: the most accurate method whenever held-out calibration
    images exist, never calibrating on evaluation images by default. Held-out retention of both is in README.
    """
    if method != "auto":
        return method, ""
    if data is None:
        return "global", "auto -> global: no dataset to draw calibration images from (pass --data for obs)"
    try:
        _train_split(data)
    except ConfigError as e:
        reason = str(e).split(";")[0]
    else:
        reason = "" if allow_overlap else find_overlap(data)
    if reason:
        return "global", (f"auto -> global: no held-out calibration images ({reason}); set "
                          "calibration.allow_overlap: true to calibrate anyway, or method: global to silence this")
    return "obs", f"auto -> obs: {images} train-split images, none of them in val"


__all__ = ["load_calibration_images", "check_disjoint", "find_overlap", "resolve_method"]


# --------------------------------------------------------------------------------------------------
# calibration data with labels (for Taylor importance)
# --------------------------------------------------------------------------------------------------
def load_calibration_batch(data: Any, imgsz: int, n: int = 16, seed: int = 0,
                           allow_overlap: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` train-split images ``(N,3,imgsz,imgsz)`` in [0,1] and their YOLOv5 targets ``(M,6)``.

    Same draw (seeded permutation), letterbox and train/val overlap check (unless ``allow_overlap``) as
    :func:`calibration.load_calibration_images`; the targets are in the format YOLOv5's ``ComputeLoss`` takes
    (``image index, class, x, y, w, h`` normalised).
    """
    from ..backend.loading import get_backend
    from .calibration import _train_split, check_disjoint

    if n < 1:
        raise ConfigError(f"calibration.images must be >= 1, got {n}")
    if not allow_overlap:
        check_disjoint(data)
    train, where = _train_split(data)
    b = get_backend()
    imgsz = int(b.general.check_img_size(imgsz, 32))
    ds = _train_dataset(train, where, imgsz, 1)
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(ds), generator=g)[: min(n, len(ds))].tolist()
    ims, targets = [], []
    for j, i in enumerate(order):
        im, labels = ds[i][0], ds[i][1]
        ims.append(im.float() / 255.0)
        labels = labels.clone()
        labels[:, 0] = j
        targets.append(labels)
    return torch.stack(ims), torch.cat(targets) if targets else torch.zeros((0, 6))


def _default_hyp() -> dict:
    import yaml

    from ..backend.loading import get_backend

    path = Path(get_backend().root) / "data" / "hyps" / "hyp.scratch-low.yaml"
    return dict(yaml.safe_load(path.read_text(encoding="utf-8")))


def _scaled_hyp(hyp: dict, det: nn.Module, imgsz: int) -> dict:
    """The loss gains of a hyp file scaled as train.py scales them (layers, classes, image size)."""
    nl, nc = int(det.nl), int(det.nc)
    return {**hyp, "box": float(hyp["box"]) * 3 / nl, "cls": float(hyp["cls"]) * nc / 80 * 3 / nl,
            "obj": float(hyp["obj"]) * (imgsz / 640) ** 2 * 3 / nl}


def accumulate_loss_gradients(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                              batch_size: int = 8) -> float:
    """Fill ``.grad`` of every parameter with the gradient of YOLOv5's own training loss on the batch.

    BatchNorm runs in train mode (as in training) but its running statistics are restored afterwards; no
    weight changes. The loss gains are the model's own ``hyp`` (train.py saved it already scaled), else the
    default hyp file's, scaled once for this model's layers and classes and the images' size. Returns the mean
    loss.
    """
    from ..backend.loading import get_backend

    b = get_backend()
    loss_mod = importlib.import_module(b.prefix + "utils.loss")
    old_hyp = getattr(model, "hyp", None)
    # train.py scales the gains and stores that hyp with the model: a trained checkpoint's is used as it is
    hyp = dict(old_hyp) if old_hyp else _scaled_hyp(_default_hyp(), model.model[-1], int(images.shape[-1]))
    model.hyp = hyp
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    was_training = model.training
    p0 = next(model.parameters())
    total, n = 0.0, 0
    try:
        compute_loss = loss_mod.ComputeLoss(model)
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(p0.device, p0.dtype)
            t = targets[(targets[:, 0] >= i) & (targets[:, 0] < i + batch_size)].clone()
            t[:, 0] -= i
            loss, _ = compute_loss(model(x), t.to(p0.device))
            loss.backward()
            total += float(loss.detach())
            n += 1
    finally:
        model.load_state_dict({**model.state_dict(), **buffers})
        model.train(was_training)
        if old_hyp is None:
            del model.hyp
        else:
            model.hyp = old_hyp
    return total / max(n, 1)

