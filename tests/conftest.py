"""Shared fixtures: the YOLOv5 backend, shared/ data (skipped when absent), small real YOLOv5 models."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("YOLO_PRUNE_SHARED", ROOT.parent / "shared"))
SHARED_WEIGHTS = SHARED / "weights" / "yolov5n.pt"

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


def data_yaml(shared: Path, name: str, dest: Path) -> Path:
    """A copy of shared/data/<name>.yaml with an absolute ``path:``."""
    from yolo_prune_plugin.backend.evaluation import write_absolute_data_yaml

    return write_absolute_data_yaml(shared / "data" / f"{name}.yaml", dest)


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


def save_checkpoint(model: torch.nn.Module, path: Path, **extra) -> Path:
    """Save ``model`` the way YOLOv5's train.py + strip_optimizer do (fp16, no EMA)."""
    m = copy.deepcopy(model).half()
    for p in m.parameters():
        p.requires_grad_(False)
    ckpt = {"epoch": -1, "best_fitness": None, "model": m, "ema": None, "updates": None, "optimizer": None,
            "opt": {}, "date": "2026-01-01T00:00:00", **extra}
    torch.save(ckpt, path)
    return path


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


def plain_attempt_load(path: Path, imgsz: int = 64) -> tuple[list[int], list[int]]:
    """Load ``path`` with YOLOv5's ``attempt_load`` in a fresh interpreter that never imports the plugin (no
    allow-list: YOLOv5 as users run it), run one forward; returns (output shape, fused Conv2d widths)."""
    import subprocess
    import sys

    code = ("import sys, torch; from yolov5.models.experimental import attempt_load\n"
            f"m = attempt_load({str(path)!r}, device='cpu', fuse=True)\n"
            "assert 'yolo_prune_plugin' not in sys.modules\n"
            f"y = m(torch.zeros(1, 3, {imgsz}, {imgsz}))[0]\n"
            "print(list(y.shape), [c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)])\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # what plain YOLOv5 7.0 needs on torch >= 2.6
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    shape, widths = out.stdout.strip().splitlines()[-1].split("] ", 1)
    return [int(v) for v in shape.strip("[").split(",")], [int(v) for v in widths.strip("[]").split(",")]


def assert_dense_slices(pruned: torch.nn.Module, dense: torch.nn.Module, kept: dict, refit: bool = False) -> int:
    """Each Conv2d of the channel-pruned ``pruned`` holds ``dense``'s weights of the output channels it kept
    (``kept``: conv name -> original indices, absent = all) at an ordered subset of the dense input channels:
    the pruned model is a slice of the dense one, not a model re-initialised at the smaller widths. Compared in
    ``pruned``'s dtype; returns how many convs were checked and lost channels. ``refit``: the pruning reconstructed
    the convs whose inputs lost channels (``channel.reconstruct``), so only the other convs are compared."""
    dense_mods = dict(dense.named_modules())
    narrowed = 0
    for name, m in pruned.named_modules():
        if not isinstance(m, torch.nn.Conv2d):
            continue
        d = dense_mods[name]
        rows = kept.get(name, list(range(d.out_channels)))
        assert len(rows) == m.out_channels, f"{name}: {m.out_channels} channels, {len(rows)} kept"
        if refit and m.in_channels != d.in_channels:
            continue  # refitted to the dense outputs: its weights are new by design
        want, got = d.weight.detach()[rows].to(m.weight.dtype), m.weight.detach()
        j = 0  # greedy in order: the kept input channels keep their order (random weights: columns are unique)
        for c in range(want.shape[1]):
            if j < got.shape[1] and torch.equal(got[:, j], want[:, c]):
                j += 1
        assert j == got.shape[1], f"{name}: input channel {j} holds no dense input channel's weights"
        if m.bias is not None:
            assert torch.equal(m.bias.detach(), d.bias.detach()[rows].to(m.bias.dtype)), name
        narrowed += (m.out_channels, m.in_channels) != (d.out_channels, d.in_channels)
    return narrowed
