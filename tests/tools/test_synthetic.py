"""The embedded synthetic dataset: deterministic, valid YOLO labels that match the drawn shapes, loadable by
YOLOv5, reused when identical and never written over someone else's files."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy import ndimage

from yolo_prune_plugin.backend.patches import driving_yolov5
from yolo_prune_plugin.tools import synthetic as S
from yolo_prune_plugin.backend.loading import get_backend
from yolo_prune_plugin.errors import PruneError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "data.yaml"}


def _labels(root: Path, split: str = "train") -> dict[Path, np.ndarray]:
    out = {}
    for p in sorted((root / "labels" / split).glob("*.txt")):
        out[p] = np.loadtxt(p, ndmin=2)
    return out


@pytest.mark.parametrize("seed", [0, 3])
def test_same_seed_gives_identical_files(tmp_path: Path, seed: int) -> None:
    a = S.make_dataset(tmp_path / "a", n_train=6, n_val=3, imgsz=96, seed=seed).parent
    b = S.make_dataset(tmp_path / "b", n_train=6, n_val=3, imgsz=96, seed=seed).parent
    c = S.make_dataset(tmp_path / "c", n_train=6, n_val=3, imgsz=96, seed=seed + 1).parent
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 2 * (6 + 3) + 1  # images + labels + marker
    assert fa == fb
    imgs = [k for k in fa if k.endswith(".jpg")]
    assert all(fa[k] != fc[k] for k in imgs), "another seed must draw other images"


def test_more_images_only_appends(tmp_path: Path) -> None:
    small = _files(S.make_dataset(tmp_path / "s", n_train=3, n_val=2, imgsz=64).parent)
    big = _files(S.make_dataset(tmp_path / "b", n_train=5, n_val=2, imgsz=64).parent)
    assert all(big[k] == v for k, v in small.items() if not k.startswith(S.MARKER))


@pytest.mark.parametrize("imgsz", [64, 160])
def test_labels_are_valid_yolo_boxes(tmp_path: Path, imgsz: int) -> None:
    root = S.make_dataset(tmp_path / "d", n_train=20, n_val=5, imgsz=imgsz).parent
    for split, n in (("train", 20), ("val", 5)):
        labels = _labels(root, split)
        assert len(labels) == n and len(list((root / "images" / split).glob("*.jpg"))) == n
        for path, lab in labels.items():
            assert lab.shape[1] == 5 and 1 <= len(lab) <= 4, path
            cls, xywh = lab[:, 0], lab[:, 1:]
            assert np.all(cls == cls.astype(int)) and cls.min() >= 0 and cls.max() < len(S.CLASSES), path
            lo, hi = xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2
            assert lo.min() >= 0 and hi.max() <= 1 and xywh[:, 2:].min() >= 0.08, path
    with Image.open(next((root / "images" / "val").glob("*.jpg"))) as im:
        assert im.size == (imgsz, imgsz) and im.mode == "RGB"
    all_cls = np.concatenate([lab[:, 0] for lab in _labels(root).values()])
    assert set(all_cls.astype(int)) == set(range(len(S.CLASSES))), "every class should occur"


def test_boxes_match_drawn_shapes(tmp_path: Path) -> None:
    """Flood-fill each shape from its box centre in the written JPEG: the filled region's bounding box is
    the label box (within a few pixels), and its fill ratio tells the class (rectangle ~1, circle ~pi/4,
    triangle ~1/2)."""
    s = 128
    root = S.make_dataset(tmp_path / "d", n_train=30, n_val=1, imgsz=s).parent
    ratios: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for path, lab in _labels(root).items():
        im = np.asarray(Image.open(root / "images" / "train" / f"{path.stem}.jpg")).astype(float)
        for c, x, y, w, h in lab:
            x0, y0, x1, y1 = (x - w / 2) * s, (y - h / 2) * s, (x + w / 2) * s, (y + h / 2) * s
            cx, cy = int(x * s), int(y * s)
            colour = np.median(im[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3), 0)
            wx0, wy0 = max(int(x0) - 4, 0), max(int(y0) - 4, 0)  # search a window a little larger than the box
            window = im[wy0:int(y1) + 5, wx0:int(x1) + 5]
            blobs, _ = ndimage.label(np.linalg.norm(window - colour, axis=2) < 45)
            ys, xs = np.nonzero(blobs == blobs[cy - wy0, cx - wx0])
            found = (xs.min() + wx0, ys.min() + wy0, xs.max() + wx0 + 1, ys.max() + wy0 + 1)
            assert np.abs(np.subtract(found, (x0, y0, x1, y1))).max() <= 5, (path, c, found, (x0, y0, x1, y1))
            ratios[int(c)].append(len(xs) / (w * h * s * s))
    circle, rect, tri = (np.array(ratios[i]) for i in range(3))
    assert len(circle) and len(rect) and len(tri)
    assert rect.min() > 0.7 and 0.55 < circle.min() and circle.max() < 0.9 and tri.max() < 0.6
    assert np.median(rect) > 0.85 and 0.65 < np.median(circle) < 0.85 and np.median(tri) < 0.55


def test_data_yaml_loads_through_yolov5(tmp_path: Path) -> None:
    yaml_path = S.make_dataset(tmp_path / "d", n_train=4, n_val=2, imgsz=64)
    raw = yaml.safe_load(yaml_path.read_text())
    assert Path(raw["path"]).is_absolute() and Path(raw["path"]) == yaml_path.parent
    assert raw["train"] == "images/train" and raw["val"] == "images/val"
    assert raw["nc"] == 3 and raw["names"] == {0: "circle", 1: "rectangle", 2: "triangle"}
    b = get_backend()
    with driving_yolov5(b):  # YOLOv5 called directly: offline font etc.
        data = b.general.check_dataset(str(yaml_path))
    assert data["nc"] == 3 and Path(data["train"]) == yaml_path.parent / "images" / "train"
    dl = importlib.import_module(b.prefix + "utils.dataloaders")
    ds = dl.LoadImagesAndLabels(data["val"], img_size=64, augment=False, cache_images=False)
    assert len(ds) == 2 and all(len(lab) for lab in ds.labels)  # YOLOv5 found no corrupt image/label
    got = np.concatenate(ds.labels)
    want = np.concatenate(list(_labels(yaml_path.parent, "val").values()))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_reuses_identical_dataset_without_rewriting(tmp_path: Path) -> None:
    y1 = S.make_dataset(tmp_path / "d", n_train=3, n_val=2, imgsz=64)
    (y1.parent / "labels" / "train.cache").write_bytes(b"yolov5 writes this")  # training leaves caches behind
    stamps = {p: p.stat().st_mtime_ns for p in y1.parent.rglob("*.jpg")}
    y2 = S.make_dataset(tmp_path / "d", n_train=3, n_val=2, imgsz=64)
    assert y2 == y1 and y2.is_absolute()
    assert {p: p.stat().st_mtime_ns for p in y1.parent.rglob("*.jpg")} == stamps


def test_moved_dataset_gets_its_yaml_path_updated(tmp_path: Path) -> None:
    old = S.make_dataset(tmp_path / "old", n_train=2, n_val=1, imgsz=64).parent
    old.rename(tmp_path / "new")
    y = S.make_dataset(tmp_path / "new", n_train=2, n_val=1, imgsz=64)
    assert Path(yaml.safe_load(y.read_text())["path"]) == tmp_path / "new"


@pytest.mark.parametrize("other", [{"n_train": 4}, {"seed": 1}, {"imgsz": 96}])
def test_refuses_dataset_with_other_parameters(tmp_path: Path, other: dict) -> None:
    kw = {"n_train": 3, "n_val": 2, "imgsz": 64, "seed": 0}
    root = S.make_dataset(tmp_path / "d", **kw).parent
    with pytest.raises(PruneError, match=re.escape(str(root))):
        S.make_dataset(root, **{**kw, **other})
    y = S.make_dataset(root, **{**kw, **other}, overwrite=True)
    assert len(_labels(root)) == {**kw, **other}["n_train"]
    assert json.loads((root / S.MARKER).read_text())["params"]["seed"] == {**kw, **other}["seed"]
    assert y == root / "data.yaml"


def test_refuses_folder_with_user_files_and_keeps_them(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    (root / "images" / "train").mkdir(parents=True)
    precious = root / "notes.txt"
    precious.write_text("keep me")
    (root / "images" / "train" / "photo.jpg").write_bytes(b"user photo")
    with pytest.raises(PruneError, match=f"{re.escape(str(root))}.*overwrite=True"):
        S.make_dataset(root, n_train=2, n_val=1, imgsz=64)
    assert precious.read_text() == "keep me" and (root / "images" / "train" / "photo.jpg").exists()
    assert not (root / "labels").exists() and not (root / "data.yaml").exists()
    S.make_dataset(root, n_train=2, n_val=1, imgsz=64, overwrite=True)
    assert precious.read_text() == "keep me"  # overwrite replaces only the dataset's own paths
    assert sorted(p.name for p in (root / "images" / "train").iterdir()) == ["000000.jpg", "000001.jpg"]


def test_refuses_when_its_files_were_changed(tmp_path: Path) -> None:
    root = S.make_dataset(tmp_path / "d", n_train=2, n_val=1, imgsz=64).parent
    (root / "images" / "train" / "extra.jpg").write_bytes(b"added by the user")
    with pytest.raises(PruneError, match="changed"):
        S.make_dataset(root, n_train=2, n_val=1, imgsz=64)
    assert (root / "images" / "train" / "extra.jpg").exists()


def test_redoes_its_own_interrupted_run(tmp_path: Path) -> None:
    root = S.make_dataset(tmp_path / "d", n_train=3, n_val=1, imgsz=64).parent
    marker = json.loads((root / S.MARKER).read_text())
    (root / S.MARKER).write_text(json.dumps({**marker, "complete": False}))  # as if killed half-way
    (root / "images" / "train" / "000002.jpg").unlink()
    S.make_dataset(root, n_train=3, n_val=1, imgsz=64)
    assert (root / "images" / "train" / "000002.jpg").is_file()
    assert json.loads((root / S.MARKER).read_text())["complete"] is True


@pytest.mark.parametrize("kw", [{"n_train": 0}, {"n_val": 0}, {"imgsz": 16}, {"seed": -1}])
def test_rejects_bad_parameters(tmp_path: Path, kw: dict) -> None:
    with pytest.raises(PruneError, match="make_dataset"):
        S.make_dataset(tmp_path / "d", **{"n_train": 2, "n_val": 1, "imgsz": 64, **kw})
    assert not (tmp_path / "d").exists()


def test_refuses_a_file_as_root(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(PruneError, match="not a folder"):
        S.make_dataset(f, n_train=2, n_val=1, imgsz=64)


@pytest.mark.parametrize("preset", [S.DEMO, S.TINY], ids=["demo", "tiny"])
def test_preset_overrides_point_at_a_shipped_cfg_and_download_nothing(tmp_path: Path, preset: S.Preset) -> None:
    ov = preset.train_overrides(tmp_path / "data.yaml", tmp_path / "runs")
    assert Path(ov["cfg"]).is_file() and Path(ov["cfg"]).is_relative_to(get_backend().root)
    assert Path(ov["hyp"]).is_file() and Path(ov["hyp"]).is_relative_to(get_backend().root)
    assert ov["weights"] == "" and ov["device"] == "cpu" and Path(ov["data"]).is_absolute()
    opt = get_backend().train.parse_opt(True)
    assert set(ov) <= set(vars(opt)), "every override must be a YOLOv5 train option"
