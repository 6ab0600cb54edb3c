"""Shared fixtures: the YOLOv5 backend, shared/ data (skipped when absent), small real YOLOv5 models."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from testkit import SHARED, SHARED_WEIGHTS, data_yaml, save_checkpoint

TESTS = Path(__file__).resolve().parent

#: Test files to start first (lower first): README's command runs a whole file on one worker (``--dist loadfile
#: --no-loadscope-reorder``) in this order, so the longest files (about 20-50 s each on a 2-core machine) start at
#: once and the many short ones fill in behind them instead of stretching the tail. Everything else keeps its
#: collection order after these.
FIRST = {"prune/test_channel.py": 0, "test_api_preflight.py": 0, "e2e/test_three_line.py": 0,
         "prune/test_channel_sensitivity.py": 0, "e2e": 1, "training/test_finetune.py": 1,
         "training/test_channel_schedule.py": 1, "tools/test_budget_run.py": 2, "backend/test_distributed.py": 2,
         "test_callbacks.py": 2, "training/test_channel_regularize.py": 2, "test_cli.py": 2,
         "backend/test_export.py": 2, "test_pipeline.py": 2}
LAST = 3


def pytest_collection_modifyitems(config, items):
    """Tests under tests/e2e/ get the ``e2e`` marker (``-m "not e2e"``: a quick loop without whole trainings);
    the long files go first (:data:`FIRST`)."""
    def rel(item) -> str:
        return Path(str(item.fspath)).resolve().relative_to(TESTS).as_posix()

    def rank(item) -> int:
        r = rel(item)
        return min([v for k, v in FIRST.items() if r == k or r.startswith(k + "/")], default=LAST)

    for item in items:
        if rel(item).startswith("e2e/"):
            item.add_marker(pytest.mark.e2e)
    items.sort(key=rank)  # stable: collection order within a rank


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
def tiny_images(tiny_data) -> torch.Tensor:
    """Four calibration images of ``tiny_data``'s train split at 64 px."""
    from yolo_prune_plugin.prune.calibration import load_calibration_images

    return load_calibration_images(tiny_data, 64, n=4)


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


@pytest.fixture(scope="module")
def small_yolo(backend):
    """A real YOLOv5 DetectionModel (yolov5n.yaml at 1/8 width, 3 classes), randomly initialised, with non-trivial
    BatchNorm statistics as in a trained model."""
    cfg = yaml.safe_load((backend.root / "models" / "yolov5n.yaml").read_text())
    cfg["width_multiple"] = 0.125
    torch.manual_seed(0)
    model = backend.yolo.Model(cfg, ch=3, nc=3).eval()
    # give BatchNorm non-trivial statistics, as in a trained model
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model
