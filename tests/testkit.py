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


_PLAIN_SERVER = """
import json, sys, torch
from yolov5.models.experimental import attempt_load
for line in sys.stdin:
    req = json.loads(line)
    try:
        m = attempt_load(req["path"], device="cpu", fuse=True)
        y = m(torch.zeros(1, 3, req["imgsz"], req["imgsz"]))[0]
        out = {"result": [list(y.shape), [c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)]],
               "plugin_imported": "yolo_prune_plugin" in sys.modules}
    except Exception as e:
        out = {"error": f"{type(e).__name__}: {e}"}
    print("RESULT " + json.dumps(out), flush=True)
"""


class _PlainYOLOv5:
    """One interpreter per test process that never imports the plugin (no allow-list: YOLOv5 as users run it),
    started on first use and asked to load each file: YOLOv5 is imported once, not once per file."""

    proc = None
    lines = None  # queue.Queue of the answers
    log = None

    @classmethod
    def load(cls, path: str, imgsz: int) -> list:
        import atexit
        import json
        import queue
        import subprocess
        import sys
        import tempfile
        import threading

        if cls.proc is None or cls.proc.poll() is not None:
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # what plain YOLOv5 7.0 needs on torch >= 2.6
            cls.log = tempfile.NamedTemporaryFile(prefix="plain-yolov5-", suffix=".log", delete=False)
            cls.proc = subprocess.Popen([sys.executable, "-c", _PLAIN_SERVER], env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=cls.log, text=True)
            cls.lines = queue.Queue()

            def drain(out=cls.proc.stdout, q=cls.lines):
                for line in out:
                    if line.startswith("RESULT "):
                        q.put(json.loads(line[7:]))
                q.put({"error": "the plain YOLOv5 interpreter exited"})

            threading.Thread(target=drain, daemon=True).start()
            atexit.register(cls.proc.kill)
        cls.proc.stdin.write(json.dumps({"path": str(path), "imgsz": int(imgsz)}) + "\n")
        cls.proc.stdin.flush()
        try:
            out = cls.lines.get(timeout=300)
        except queue.Empty:
            cls.proc.kill()
            raise AssertionError("plain YOLOv5 did not answer within 300 s") from None
        assert "error" not in out, f"{out['error']}\n{Path(cls.log.name).read_text()[-2000:]}"
        assert out["plugin_imported"] is False
        return out["result"]


def plain_attempt_load(path, imgsz: int = 64):
    """Load ``path`` (or each of a list of paths) with YOLOv5's ``attempt_load`` in an interpreter that never
    imports the plugin, run one forward; returns (output shape, fused Conv2d widths), or a list of them."""
    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    results = [tuple(_PlainYOLOv5.load(p, imgsz)) for p in paths]
    return results if isinstance(path, (list, tuple)) else results[0]


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


def tiny_train_opt(backend, data, cfg, project, name, epochs=1):
    """YOLOv5's train options for a tiny CPU run: ``cfg`` from scratch on ``data`` at 64 px, batch 4, no plots."""
    from yolo_prune_plugin.api import train_opt

    return train_opt([], backend, data=str(data), cfg=str(cfg), weights="", imgsz=64, epochs=epochs, batch_size=4,
                     device="cpu", workers=0, noplots=True, noautoanchor=True, project=str(project), name=name)


def assert_yolov5_restored(backend):
    """YOLOv5's train module points at its own optimizer, EMA and resume functions again (patches undone)."""
    import importlib

    tu = importlib.import_module(backend.prefix + "utils.torch_utils")
    assert backend.train.smart_optimizer is tu.smart_optimizer
    assert backend.train.ModelEMA is tu.ModelEMA and backend.train.smart_resume is tu.smart_resume


def assert_plain_yolov5(model):
    """No pruning re-parametrisation and no hooks travel with a saved model."""
    keys = list(model.state_dict())
    assert not [k for k in keys if k.endswith(("_orig", "_mask"))]
    assert not any(m._forward_pre_hooks or m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(p._backward_hooks for p in model.parameters() if getattr(p, "_backward_hooks", None))


def seeded_rand(*shape: int, seed: int = 0) -> torch.Tensor:
    """``torch.rand(*shape)`` from a generator of its own: the same numbers whatever ran before in this worker
    (YOLOv5's ``train.main`` reseeds the global RNG)."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def config_from_flags(argv: list, prefix: str, match: "str | None" = None):
    """The config `yolo-prune <argv>` builds from its flags (``prefix``: "" for prune, "prune-" for train); with
    ``match``, assert instead that it is refused with that one-line error."""
    import pytest

    from yolo_prune_plugin.cli import _config_from_args, build_parser
    from yolo_prune_plugin.errors import ConfigError

    ns = build_parser().parse_known_args(argv)[0]
    if match is None:
        return _config_from_args(ns, prefix)
    with pytest.raises(ConfigError, match=match) as e:
        _config_from_args(ns, prefix)
    assert "\n" not in str(e.value)
    return None
