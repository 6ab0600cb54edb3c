"""A small, seeded synthetic detection dataset in YOLO format (the plugin's offline default data).

Every image shows 1-4 filled shapes (circle, rectangle, triangle) of varied size and colour on a varied
background (noise, gradients, clutter lines and specks), with one tight axis-aligned box per shape. Each
image is drawn from its own RNG seeded by ``(seed, split, index)``, so the same parameters always give
byte-identical files and a larger ``n_train`` only appends images.

Layout written under ``root``::

    images/{train,val}/000000.jpg   labels/{train,val}/000000.txt   data.yaml   .synthetic.json

:data:`DEMO` holds settings that train a YOLOv5 model from scratch on CPU to mAP50 >= 0.5 in a few
minutes; :data:`TINY` holds settings for a real training run of a few seconds in tests.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import PruneError

#: Class names, in label-id order.
CLASSES: tuple[str, ...] = ("circle", "rectangle", "triangle")
#: Bump when the drawing code changes, so datasets made by older code are not reused as if identical.
FORMAT_VERSION = 1
MARKER = ".synthetic.json"
SPLITS = ("train", "val")

Box = tuple[int, float, float, float, float]  # class id, x0, y0, x1, y1 in pixels (x1, y1: last pixel drawn)

_MIN_CONTRAST = 90.0  # minimum RGB distance between a shape's colour and (almost all of) its background


@dataclass(frozen=True)
class Preset:
    """Dataset sizes and YOLOv5 training settings for one use of the synthetic data.

    ``cfg`` and ``hyp`` name files shipped inside YOLOv5 (``models/`` and ``data/hyps/``), so training from
    scratch (``weights=''``) downloads nothing. Without augmentation and with Adam, YOLOv5n learns the
    shapes in a few hundred optimizer steps; YOLOv5's default (mosaic, SGD) needs many times more.
    """

    n_train: int
    n_val: int
    imgsz: int
    epochs: int
    batch_size: int
    cfg: str = "yolov5n.yaml"
    hyp: str = "hyp.no-augmentation.yaml"
    optimizer: str = "Adam"

    def dataset_kwargs(self) -> dict[str, int]:
        """Keyword arguments for :func:`make_dataset`."""
        return {"n_train": self.n_train, "n_val": self.n_val, "imgsz": self.imgsz}

    def train_overrides(self, data: str | Path, project: str | Path, name: str = "exp",
                        yolov5_root: str | Path | None = None) -> dict[str, Any]:
        """Attributes to set on ``b.train.parse_opt(True)`` to train this preset on CPU, all paths absolute."""
        if yolov5_root is None:
            from ..backend.loading import get_backend

            yolov5_root = get_backend().root
        root = Path(yolov5_root).resolve()
        return {"data": str(Path(data).resolve()), "cfg": str(root / "models" / self.cfg), "weights": "",
                "hyp": str(root / "data" / "hyps" / self.hyp), "optimizer": self.optimizer,
                "imgsz": self.imgsz, "epochs": self.epochs, "batch_size": self.batch_size, "device": "cpu",
                "workers": 0, "noplots": True, "project": str(Path(project).resolve()), "name": name,
                "exist_ok": True}


#: README demo: YOLOv5n from scratch reaches mAP50 >= 0.5 on the val split in a few CPU minutes.
DEMO = Preset(n_train=512, n_val=128, imgsz=128, epochs=20, batch_size=16)
#: Tests: a real but tiny training run (seconds); its mAP is meaningless.
TINY = Preset(n_train=8, n_val=4, imgsz=64, epochs=1, batch_size=4)


def make_dataset(root: str | Path, n_train: int = DEMO.n_train, n_val: int = DEMO.n_val,
                 imgsz: int = DEMO.imgsz, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the synthetic dataset under ``root`` (or reuse the identical one already there).

    Returns the absolute path of ``root/data.yaml``. Raises :class:`PruneError` if ``root`` holds anything
    other than a dataset made with the same parameters, unless ``overwrite=True``, which replaces only the
    paths this function writes (``images/{train,val}``, ``labels/{train,val}``, their ``.cache`` files,
    ``data.yaml`` and the marker); other files in ``root`` are left alone.
    """
    if n_train < 1 or n_val < 1:
        raise PruneError(f"make_dataset: n_train and n_val must be >= 1 (got {n_train}, {n_val})")
    if imgsz < 32:
        raise PruneError(f"make_dataset: imgsz must be >= 32 pixels (got {imgsz})")
    if seed < 0:
        raise PruneError(f"make_dataset: seed must be >= 0 (got {seed})")
    root = Path(root).expanduser().resolve()
    params = {"format": FORMAT_VERSION, "n_train": int(n_train), "n_val": int(n_val), "imgsz": int(imgsz),
              "seed": int(seed), "classes": list(CLASSES)}
    marker = root / MARKER
    if root.exists() and not root.is_dir():
        raise PruneError(f"{root}: exists and is not a folder (expected a folder for the synthetic dataset)")
    found = _read_marker(marker)
    same = found is not None and found.get("params") == params
    if same and found.get("complete") and _files_present(root, params):
        return _write_yaml(root)  # reuse; rewrite the yaml in case the folder was moved
    partial = same and not found.get("complete")  # our own interrupted run: safe to redo
    if root.exists() and any(root.iterdir()) and not (overwrite or partial):
        what = ("a synthetic dataset whose files were changed" if same else
                "a synthetic dataset made with other parameters" if found is not None else "other files")
        raise PruneError(f"{root}: holds {what}; choose an empty folder or pass overwrite=True to replace it")
    _clear(root)
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"params": params, "complete": False}, indent=1))
    for split, n in zip(SPLITS, (n_train, n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            image, boxes = render(seed, split, i, imgsz)
            image.save(root / "images" / split / f"{i:06d}.jpg", quality=92)
            (root / "labels" / split / f"{i:06d}.txt").write_text(_label_text(boxes, imgsz))
    yaml_path = _write_yaml(root)
    marker.write_text(json.dumps({"params": params, "complete": True}, indent=1))
    return yaml_path


def render(seed: int, split: str, index: int, imgsz: int) -> tuple[Image.Image, list[Box]]:
    """Draw image ``index`` of ``split``; returns it with one :data:`Box` per shape."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    bg = _background(rng, imgsz)
    image = Image.fromarray(bg)
    draw = ImageDraw.Draw(image)
    boxes: list[Box] = []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(30):  # place without overlapping earlier shapes (keeps every box fully visible)
            cls = int(rng.integers(len(CLASSES)))
            side = rng.uniform(0.14, 0.42) * imgsz
            aspect = rng.uniform(0.6, 1.6) if cls else 1.0  # circles stay round
            w, h = side * min(1.0, aspect), side * min(1.0, 1 / aspect)
            x0, y0 = rng.uniform(1, imgsz - 2 - w), rng.uniform(1, imgsz - 2 - h)
            box = (cls, x0, y0, x0 + w, y0 + h)
            if all(_apart(box, b) for b in boxes):
                break
        else:
            continue
        colour = _contrasting_colour(rng, bg[int(y0):int(y0 + h) + 1, int(x0):int(x0 + w) + 1])
        x1, y1 = x0 + w, y0 + h
        if cls == 0:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif cls == 1:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:  # apex on one horizontal edge, base on the other: the box is tight and its centre inside
            apex = x0 + rng.uniform(0.25, 0.75) * w
            pts = [(apex, y0), (x0, y1), (x1, y1)] if rng.random() < 0.5 else [(apex, y1), (x0, y0), (x1, y0)]
            draw.polygon(pts, fill=colour)
        boxes.append(box)
    return image, boxes


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:  # flat colour with noise
        img = np.broadcast_to(rng.uniform(0, 255, 3), (s, s, 3)).astype(np.float64)
    else:  # linear gradient between two colours at a random angle
        a, c = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:s, 0:s] / max(s - 1, 1)
        t = (np.cos(theta) * xx + np.sin(theta) * yy)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        img = a + (c - a) * t[..., None]
        if kind == 2:  # plus low-frequency blotches
            blot = np.stack([np.asarray(Image.fromarray(ch).resize((s, s), Image.BILINEAR))
                             for ch in rng.normal(0, 40, (3, 4, 4)).astype(np.float32)], -1)
            img = img + blot
    img = img + rng.normal(0, rng.uniform(2, 20), (s, s, 3))
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for _ in range(int(rng.integers(0, 12))):  # clutter: thin lines and specks, too small to be objects
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.line([tuple(rng.uniform(0, s, 2)), tuple(rng.uniform(0, s, 2))], fill=col, width=1)
        else:
            x, y, r = *rng.uniform(0, s, 2), rng.uniform(0.5, max(1.0, s * 0.02))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=col)
    return np.asarray(out).copy()


def _contrasting_colour(rng: np.random.Generator, patch: np.ndarray) -> tuple[int, int, int]:
    px = patch.reshape(-1, 3).astype(np.float64)
    best, best_d = None, -1.0
    for _ in range(50):
        c = rng.integers(0, 256, 3).astype(np.float64)
        d = float(np.percentile(np.linalg.norm(px - c, axis=1), 2))
        if d > best_d:
            best, best_d = c, d
        if d >= _MIN_CONTRAST:
            break
    return tuple(int(v) for v in best)  # type: ignore[return-value]


def _apart(a: tuple, b: tuple, gap: float = 2.0) -> bool:
    return a[3] + gap < b[1] or b[3] + gap < a[1] or a[4] + gap < b[2] or b[4] + gap < a[2]


def _label_text(boxes: list[Box], s: int) -> str:
    lines = []
    for cls, x0, y0, x1, y1 in boxes:
        # PIL fills pixels x0..x1 inclusive: the box spans [x0, x1 + 1) in pixel-area coordinates
        x0, y0, x1, y1 = (min(max(v, 0.0), s) for v in (x0, y0, x1 + 1, y1 + 1))
        lines.append(f"{cls} {(x0 + x1) / 2 / s:.6f} {(y0 + y1) / 2 / s:.6f} {(x1 - x0) / s:.6f} "
                     f"{(y1 - y0) / s:.6f}")
    return "\n".join(lines) + "\n"


def _write_yaml(root: Path) -> Path:
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASSES))
    text = (f"# synthetic shapes dataset written by yolo_prune_plugin.tools.synthetic\n"
            f"path: {json.dumps(str(root))}\ntrain: images/train\nval: images/val\n"
            f"nc: {len(CLASSES)}\nnames:\n{names}\n")
    path = root / "data.yaml"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def _read_marker(marker: Path) -> dict | None:
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _files_present(root: Path, params: dict) -> bool:
    for split in SPLITS:
        n = params[f"n_{split}"]
        for sub, ext in (("images", "jpg"), ("labels", "txt")):
            if not all((root / sub / split / f"{i:06d}.{ext}").is_file() for i in range(n)):
                return False
            if len(list((root / sub / split).iterdir())) != n:
                return False
    return True


def _clear(root: Path) -> None:
    """Remove only the paths :func:`make_dataset` writes (and YOLOv5's label caches next to them)."""
    for split in SPLITS:
        for p in (root / "images" / split, root / "labels" / split):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        (root / "labels" / f"{split}.cache").unlink(missing_ok=True)
    for name in ("data.yaml", MARKER):
        (root / name).unlink(missing_ok=True)
