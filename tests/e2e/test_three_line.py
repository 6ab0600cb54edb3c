"""README's three-line path (a user's own ``train.main`` + ``register``), in a fresh process each, for the PyPI
package and for the upstream-checkout layout (top-level ``train``/``utils``; the installed package's folder
stands in for a checkout): a plain config prunes, ``finetune:`` fine-tunes, ``schedule:`` prunes gradually,
``structure: channel`` removes channels (one epoch each). The PyPI layout runs the plain, fine-tune and schedule
configs, the checkout layout the channel one (its calibration reads the train split through the layout's dataset
class) and ``finetune.recipe: regularize`` at train end (its fade reads ``nb``/``epochs`` from the layout's ``train()``): the other modes' code is the same on both layouts (the signature drift between them is tested on mimics
in tests/backend/test_calls.py). The weights are a real checkpoint file, so YOLOv5's own ``torch.load`` must work
through ``register`` alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from yolo_prune_plugin.report import validate_report

from testkit import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import json, sys
    layout, data, cfg, weights, project, configs = sys.argv[1:7]
    if layout == "pypi":
        from yolov5.utils.callbacks import Callbacks
        from yolov5 import train as yolo_train
    else:  # a checkout: its folder is sys.path[0] (the user runs their train.py from it)
        from utils.callbacks import Callbacks
        import train as yolo_train
    from yolo_prune_plugin import load_config, register

    out = {}
    for name, path in json.loads(configs).items():
        opt = yolo_train.parse_opt(True)
        for k, v in dict(data=data, cfg=cfg, weights=weights, imgsz=64, epochs=1, batch_size=4, workers=0,
                         device="cpu", noplots=True, noautoanchor=True, project=project, name=name).items():
            setattr(opt, k, v)
        callbacks = Callbacks()                                  # the README's three lines
        plugin = register(callbacks, load_config(path), opt=opt)
        yolo_train.main(opt, callbacks=callbacks)
        out[name] = {"error": repr(plugin.error) if plugin.error else None, "ran": plugin.ran, "mode": plugin.mode,
                     "report": str(plugin.report_path), "kind": plugin.backend.kind}
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def setup(backend, tmp_path_factory):
    from yolo_prune_plugin.tools.synthetic import make_dataset

    tmp = tmp_path_factory.mktemp("three_line")
    data = make_dataset(tmp / "data", n_train=4, n_val=2, imgsz=64)
    d = yaml.safe_load((Path(backend.root) / "models" / "yolov5n.yaml").read_text())
    d.update(nc=3, width_multiple=0.125)
    cfg = tmp / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(d))
    torch.manual_seed(0)
    model = backend.yolo.Model(str(cfg), ch=3, nc=3)
    model.names = {0: "circle", 1: "rectangle", 2: "triangle"}
    weights = save_checkpoint(model, tmp / "start.pt")  # pickled as yolov5.models.*: needs the allow-list
    configs = {}
    for name, text in (("plain", "amount: 0.3\n"), ("finetune", "amount: 0.3\nfinetune: {epochs: 1}\n"),
                       ("schedule", "schedule: {start_epoch: 0, end_epoch: 0, final_amount: 0.4}\n"),
                       ("channel", "amount: 0.3\nstructure: channel\n"),
                       ("recipe", "amount: 0.3\nstructure: channel\nchannel: {importance: l1}\n"
                                  "finetune: {epochs: 2, recipe: regularize}\n")):
        configs[name] = tmp / f"{name}.yaml"
        configs[name].write_text(text)
    return data, cfg, weights, configs


MODES = {"pypi": ("plain", "finetune", "schedule"), "checkout": ("channel", "recipe")}


@pytest.mark.parametrize("layout", ["pypi", "checkout"])
def test_three_line_path_runs_every_mode(backend, setup, tmp_path, layout):
    data, cfg, weights, configs = setup
    configs = {k: v for k, v in configs.items() if k in MODES[layout]}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cwd = tmp_path
    if layout == "checkout":  # run as a user's script inside the checkout
        env["PYTHONPATH"] = os.pathsep.join((str(backend.root), str(ROOT)))
        cwd = backend.root
    proc = subprocess.run([sys.executable, "-c", SCRIPT, layout, str(data), str(cfg), str(weights),
                           str(tmp_path / "runs"), json.dumps({k: str(v) for k, v in configs.items()})],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert sorted(result) == sorted(MODES[layout])
    for name, mode, amount in (("plain", "oneshot", 0.3), ("finetune", "finetune", 0.3),
                               ("schedule", "schedule", 0.4), ("channel", "oneshot", 0.3),
                               ("recipe", "finetune", 0.3)):
        if name not in result:
            continue
        r = result[name]
        assert r == {"error": None, "ran": True, "mode": mode, "report": r["report"], "kind": layout}, r
        report = json.loads(Path(r["report"]).read_text())
        entry = validate_report(report)[0]
        if name == "recipe":  # penalty phase (its fade reads nb/epochs from train()), exact removal, fine-tune
            ft = entry.finetune
            assert ft["split"]["regularize_epochs"] == ft["split"]["finetune_epochs"] == 1
            assert ft["phases"]["regularize"]["fade_batches"] == 1  # 4 images, batch 4 (the layout's own train())
            assert ft["phases"]["regularize"]["residual"]["after"]["alive"] == 0
        if name in ("channel", "recipe"):  # channels removed: a smaller model, not zeros
            assert entry.structure == "channel" and abs(entry.channels["achieved"] - amount) <= 0.02
            assert entry.channels["params_after"] < entry.channels["params_before"]
        else:
            assert entry.mode == mode and abs(entry.sparsity_after["sparsity"] - amount) < 1e-3
        assert entry.metrics_after is not None
        pruned = torch.load(entry.output)  # plain YOLOv5 classes only (weights_only)
        assert pruned["prune"]["mode"] == mode and pruned["ema"] is None
    if "finetune" in result:
        assert Path(result["finetune"]["report"]).parent.with_name("finetune_finetune").is_dir()  # the fine-tune run
