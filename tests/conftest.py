"""Shared fixtures: the YOLOv5 backend, shared/ data (skipped when absent), small real YOLOv5 models."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from testkit import SHARED, SHARED_WEIGHTS, data_yaml, save_checkpoint

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core (-n 2): one torch thread each, no oversubscription
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Small models: one intra-op thread avoids oversubscription on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def backend():
    from yolo_prune_plugin.backend.loading import get_backend

    return get_backend()


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED_WEIGHTS.is_file():
        pytest.skip(f"needs the shared data folder ({SHARED}), which is absent on this machine")
    return SHARED


@pytest.fixture(scope="session")
def coco8_yaml(shared, tmp_path_factory) -> Path:
    return data_yaml(shared, "coco8", tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def coco128_yaml(shared, tmp_path_factory) -> Path:
    return data_yaml(shared, "coco128", tmp_path_factory.mktemp("data128"))


@pytest.fixture(scope="session")
def _small_model(backend):
    torch.manual_seed(0)
    cfg = Path(backend.root) / "models" / "yolov5n.yaml"
    model = backend.yolo.Model(str(cfg), ch=3, nc=3)
    model.names = {0: "circle", 1: "square", 2: "triangle"}
    model.nc = 3
    return model.eval()


@pytest.fixture
def small_model(_small_model):
    """A real YOLOv5n detection model (random init, 3 classes): no shared data needed."""
    return copy.deepcopy(_small_model)


@pytest.fixture
def small_ckpt(small_model, tmp_path) -> Path:
    return save_checkpoint(small_model, tmp_path / "best.pt")


@pytest.fixture(scope="session")
def yolov5n(backend, shared):
    from yolo_prune_plugin.backend.loading import load_checkpoint

    return load_checkpoint(SHARED_WEIGHTS)["model"].float().eval()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """The project's synthetic dataset, 4 train / 2 val images at 64 px (3 classes)."""
    from yolo_prune_plugin.tools import synthetic

    return synthetic.make_dataset(tmp_path_factory.mktemp("syn"), n_train=4, n_val=2, imgsz=64)


@pytest.fixture(scope="module")
def tiny_cfg(backend, tmp_path_factory) -> Path:
    """YOLOv5n at 1/8 width (real YOLOv5 modules, 3 classes): trains in seconds on CPU."""
    import yaml

    d = yaml.safe_load((Path(backend.root) / "models" / "yolov5n.yaml").read_text())
    d.update(nc=3, width_multiple=0.125)
    p = tmp_path_factory.mktemp("cfg") / "yolov5-tiny.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.fixture
def tiny_model(backend, tiny_cfg):
    """A fresh model of ``tiny_cfg`` (seed 0, 3 named classes)."""
    torch.manual_seed(0)
    m = backend.yolo.Model(str(tiny_cfg), ch=3, nc=3)
    m.names = {0: "circle", 1: "rectangle", 2: "triangle"}
    return m


