"""Helpers the tests import (``from testkit import ...``): paths of the shared data, checkpoints saved the way
YOLOv5 saves them, plain-YOLOv5 loading in a fresh interpreter, slice checks of channel-pruned models, and a
stand-in for YOLOv5's ``train.main`` that leaves a finished run folder. Fixtures live in conftest.py."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("YOLO_PRUNE_SHARED", ROOT.parent / "shared"))
SHARED_WEIGHTS = SHARED / "weights" / "yolov5n.pt"


def data_yaml(shared: Path, name: str, dest: Path) -> Path:
    """A copy of shared/data/<name>.yaml with an absolute ``path:``."""
    from yolo_prune_plugin.backend.evaluation import write_absolute_data_yaml

    return write_absolute_data_yaml(shared / "data" / f"{name}.yaml", dest)


def save_checkpoint(model: torch.nn.Module, path: Path, **extra) -> Path:
    """Save ``model`` the way YOLOv5's train.py + strip_optimizer do (fp16, no EMA)."""
    m = copy.deepcopy(model).half()
    for p in m.parameters():
        p.requires_grad_(False)
    ckpt = {"epoch": -1, "best_fitness": None, "model": m, "ema": None, "updates": None, "optimizer": None,
            "opt": {}, "date": "2026-01-01T00:00:00", **extra}
    torch.save(ckpt, path)
    return path


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


def fake_train_main(small_model):
    """Stands in for YOLOv5's ``train.main`` where the hook is the subject: writes a finished run folder the way
    train.py leaves it and fires the callbacks train.py fires (no epoch is trained)."""
    def main(opt, callbacks):
        from pathlib import Path

        callbacks.run("on_pretrain_routine_start")
        w = Path(opt.project) / opt.name / "weights"
        w.mkdir(parents=True)
        for f in ("best.pt", "last.pt"):
            save_checkpoint(small_model, w / f, opt=dict(vars(opt)))
        callbacks.run("on_train_end", w / "last.pt", w / "best.pt", 0, None)

    return main


def same_split(data: Path, dest: Path) -> Path:
    """A copy of the data YAML ``data`` whose ``train:`` is its ``val:`` (every calibration image is an evaluation
    image), written to ``dest/same.yaml``."""
    import yaml

    d = yaml.safe_load(Path(data).read_text())
    d["train"] = d["val"]
    out = Path(dest) / "same.yaml"
    out.write_text(yaml.safe_dump(d))
    return out
