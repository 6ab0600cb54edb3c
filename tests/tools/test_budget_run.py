"""Prune to a budget through the real pipeline: `yolo-prune prune --target-*` on real YOLOv5 models."""

from __future__ import annotations

import json

import pytest
import torch

from yolo_prune_plugin.cli import main
from yolo_prune_plugin.report import validate_report

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def searched(shared, coco8_yaml, tmp_path_factory):
    """`yolo-prune prune --target-drop 0.02` on the released yolov5n, coco8 at 96 px, global magnitude."""
    folder = tmp_path_factory.mktemp("budget")
    weights = folder / "best.pt"
    weights.write_bytes((shared / "weights" / "yolov5n.pt").read_bytes())
    cfg = folder / "prune.yaml"
    cfg.write_text("target: {max_evals: 3, max_drop: 0.5}\n")  # the flag below overrides max_drop
    rc = main(["prune", "--weights", str(weights), "--data", str(coco8_yaml), "--img", "96", "--device", "cpu",
               "--workers", "0", "--method", "global", "--config", str(cfg), "--target-drop", "0.02"])
    assert rc == 0
    return folder


def test_target_drop_writes_a_file_within_the_budget(searched):
    report = json.loads((searched / "prune_report.json").read_text())
    entry = validate_report(report)[0]
    t = entry.target
    assert t["options"]["max_drop"] == 0.02 and t["options"]["max_evals"] == 3 and t["met"] is True
    assert 1 <= t["evaluations"] == len(t["trace"]) <= 3
    assert t["seconds"] >= sum(p["seconds"] for p in t["trace"])  # the search's time includes every probe's
    # the choice is the largest amount that met the budget on the search images, and the file holds it
    assert entry.amount == t["amount"] == t["chosen"]["amount"] == max(p["amount"] for p in t["trace"] if p["meets"])
    assert abs(entry.sparsity_after["sparsity"] - entry.amount) < 1e-3
    for p in t["trace"]:
        assert set(p["metrics"]) == {"P", "R", "mAP50", "mAP50-95"}
        assert p["meets"] == (p["drop"] <= 0.02)
    assert t["final"]["meets"] is True and "selection bias" in t["selection_bias"]
    assert entry.metrics_before["mAP50-95"] - entry.metrics_after["mAP50-95"] <= 0.02
    assert t["final"]["drop"] == pytest.approx(entry.metrics_before["mAP50-95"] - entry.metrics_after["mAP50-95"],
                                               abs=1e-6)
    saved = torch.load(searched / "best_pruned.pt", weights_only=False)["prune"]
    assert saved["target"]["trace"] == t["trace"] and saved["config"]["amount"] is None


def test_trace_and_plot_are_in_the_run_folder(searched):
    png, rows = searched / "budget_best.png", (searched / "budget_best.csv").read_text().splitlines()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((searched / "prune_report.json").read_text())
    assert len(rows) == 1 + report["results"][0]["target"]["evaluations"]
    assert sum(r.endswith(",True,") for r in rows) == 1  # the chosen point is marked
    assert report["results"][0]["target"]["outputs"]["png"] == str(png)


def test_impossible_budget_writes_nothing_and_says_why(tiny_model, tiny_data, tmp_path, capsys):
    """1/50 of the latency cannot be reached: the closest point is named, no file is written."""
    from testkit import save_checkpoint

    weights = save_checkpoint(tiny_model, tmp_path / "best.pt")
    cfg = tmp_path / "prune.yaml"
    cfg.write_text("target: {max_evals: 2}\nchannel: {importance: l1}\nbn_recalibration: {images: 0}\n")
    rc = main(["prune", "--weights", str(weights), "--data", str(tiny_data), "--img", "64", "--device", "cpu",
               "--workers", "0", "--batch-size", "4", "--structure", "channel", "--config", str(cfg),
               "--target-speedup", "50"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1, err
    assert err.startswith("yolo-prune: error: target: no amount in [0, 0.9] meets speed-up >= 50.00x (2 evaluations")
    assert "closest: amount 0." in err and "nothing written" in err
    # no pruned file, report or plot; only the measured latency table is kept for the next run (a cache)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "latency_64.json", "prune.yaml"]


def test_target_with_amount_is_refused_before_any_work(small_ckpt, tiny_data, capsys):
    rc = main(["prune", "--weights", str(small_ckpt), "--data", str(tiny_data), "--amount", "0.3",
               "--target-drop", "0.01"])
    assert rc == 2 and "a fixed amount and a budget are alternatives" in capsys.readouterr().err
    assert not small_ckpt.with_name("best_pruned.pt").exists()


def test_register_and_api_take_a_target(backend, small_ckpt, tmp_path):
    import shlex

    from yolo_prune_plugin import load_config, register
    from yolo_prune_plugin.errors import ConfigError

    plugin = register(backend.Callbacks(), target={"max_drop": 0.01})
    assert plugin.config.target.max_drop == 0.01 and plugin.config.amount is None
    retry = shlex.split(plugin.retry_command(tmp_path / "weights" / "best.pt").splitlines()[0])
    assert retry[2] == "--config" and load_config(retry[3]) == plugin.config  # the retry searches the same budget
    from yolo_prune_plugin import prune

    with pytest.raises(ConfigError, match="target: the budget search evaluates every candidate"):
        prune(small_ckpt, None, target={"max_drop": 0.01})


def test_demo_ends_with_a_budget_search(tiny_model, tmp_path, caplog):
    import logging

    from testkit import save_checkpoint
    from yolo_prune_plugin.demo import demo_budget
    from yolo_prune_plugin.tools.synthetic import TINY, make_dataset

    caplog.set_level(logging.INFO, logger="yolo_prune_plugin")
    data = make_dataset(tmp_path / "data", **TINY.dataset_kwargs())
    (tmp_path / "exp" / "weights").mkdir(parents=True)
    ck = save_checkpoint(tiny_model, tmp_path / "exp" / "weights" / "best.pt")
    out = demo_budget(ck, data, imgsz=64, device="cpu", target={"max_evals": 2})
    assert out["png"] == str(tmp_path / "exp" / "budget" / "budget_best.png")
    assert (tmp_path / "exp" / "weights" / "best_budget.pt").is_file()
    t = out["entry"].target
    assert out["entry"].structure == "channel" and t["options"]["imgsz"] == "auto" and t["budget"]["min_speedup"] == 1.5
    assert "Accuracy against speed for the demo model" in caplog.text and "At least 1.5x faster" in caplog.text
    table = caplog.text.split("* = on the frontier):")[1].split("At least")[0]
    assert "1.00x      1.000  dense, --img 64" in table and len(table.strip().splitlines()) == 2 + len(t["trace"])


def test_search_images_are_a_seeded_subset_of_val(backend, tiny_data, tmp_path):
    from yolo_prune_plugin.backend.data import image_files
    from yolo_prune_plugin.backend.evaluation import make_settings
    from yolo_prune_plugin.tools.budget_run import search_settings

    settings = make_settings(tiny_data, 64, 4, "cpu", workers=0, backend=backend)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sub, n, total = search_settings(settings, 1, 0, tmp_path / "a")
    again, _, _ = search_settings(settings, 1, 0, tmp_path / "b")
    val = image_files(settings.data["val"])
    assert (n, total) == (1, len(val)) and len(val) > 1
    chosen = image_files(sub.data["val"])
    assert len(chosen) == 1 and set(chosen) <= set(val) and chosen == image_files(again.data["val"])
    assert search_settings(settings, None, 0, tmp_path)[0] is settings


@pytest.mark.parametrize("speedup, max_amount, pruned", [(2.5, 0.5, True), (1.5, 0.05, False)])
def test_input_size_reaches_the_file_the_report_the_export_and_the_command(tiny_model, tiny_data, tmp_path, caplog,
                                                                           capsys, monkeypatch, speedup, max_amount,
                                                                           pruned):
    """`--target-imgsz 64,32` on the real pipeline. Latency is faked as pixels x parameters (the choice between
    sizes is tested on fake curves in test_budget.py, the timing in test_bench.py): 32 px alone is 2x. At 2.5x
    only 32 px with channels removed meets it (64 px would need more than max_amount); at 1.5x with hardly any
    pruning allowed, resizing alone wins and the dense model is written to deploy at 32 px. Either way the
    deploy size reaches the checkpoint, the report, the file's own validation, the ONNX export, the printed
    command and `yolo-prune export`. The pruned case also asks `--target-after-finetune 1` with a max_drop: the
    search leaves the drop to the fine-tuned file, which is fine-tuned at the deploy size and re-checked."""
    import logging

    import onnx

    from yolo_prune_plugin.tools import budget_run

    from testkit import save_checkpoint

    dense_params = sum(p.numel() for p in tiny_model.parameters())

    def fake_measure(self, model, imgsz=None):
        ratio = sum(p.numel() for p in model.parameters()) / dense_params
        sp = (64 / (imgsz or 64)) / ratio
        return round(10 / sp, 3), round(sp, 3), None

    monkeypatch.setattr(budget_run._Timer, "measure", fake_measure)
    weights = save_checkpoint(tiny_model, tmp_path / "best.pt")
    dense_widths = [m.out_channels for m in tiny_model.modules() if isinstance(m, torch.nn.Conv2d)]
    cfg = tmp_path / "prune.yaml"
    cfg.write_text(f"target: {{max_evals: 3, max_amount: {max_amount}}}\nchannel: {{importance: l1}}\n"
                   "bn_recalibration: {images: 0}\n")
    caplog.set_level(logging.INFO, logger="yolo_prune_plugin")
    rc = main(["prune", "--weights", str(weights), "--data", str(tiny_data), "--img", "64", "--device", "cpu",
               "--workers", "0", "--batch-size", "4", "--structure", "channel", "--config", str(cfg),
               "--target-speedup", str(speedup), "--target-imgsz", "64,32",
               *(["--export", "onnx", "--target-drop", "0.5", "--target-after-finetune", "1"] if pruned else [])])
    assert rc == 0, capsys.readouterr().err
    entry = validate_report(json.loads((tmp_path / "prune_report.json").read_text()))[0]
    t = entry.target
    assert t["imgsz"] == {"searched": [64, 32], "joint": [32, 64] if pruned else [64], "evaluation": 64}
    [resized] = [p for p in t["trace"] if p["amount"] == 0]
    assert resized["imgsz"] == 32 and resized["speedup"] == 2.0
    assert entry.deploy_imgsz == t["deploy_imgsz"] == t["chosen"]["imgsz"] == 32 and entry.imgsz == 64
    assert (t["chosen"]["amount"] > 0) is pruned and t["chosen"]["speedup"] >= speedup
    if pruned:  # no resize-only point is that fast; the drop limit was left to the fine-tuned file
        assert t["resize_baseline"] is None and "no resize-only point is as fast" in t["versus_resize"]
        assert t["after_finetune"]["epochs"] == 1 and t["after_finetune"]["search_limits"]["max_drop"] is None
        assert t["after_finetune"]["max_drop_on"] == "fine-tuned model" and t["budget"]["max_drop"] == 0.5
        assert t["final"]["on"] == "fine-tuned model" and t["final"]["max_drop"] == 0.5
        assert t["one_shot"]["on"] == "one-shot model" and entry.finetune["epochs"] == 1
        assert entry.finetune["imgsz"] == 32  # recovery at the deploy size
        assert entry.channels["allocation"] == "latency"  # the default allocation of a speed budget
        assert entry.channels["latency"]["measured"] > 0 and (tmp_path / "latency_64.json").is_file()
        assert "max_drop 0.5000 is checked on the file after 1 fine-tune epochs" in caplog.text
        assert all(p["imgsz"] in (32, 64) and p["amount"] <= max_amount for p in t["trace"])
    else:
        assert "after_finetune" not in t and t["final"]["on"] == "one-shot model"
        assert t["resize_baseline"] == t["chosen"] and "resizing alone wins" in t["versus_resize"]
        assert entry.method_details["resized_only"].startswith("no channel removed")
    widths = [m.out_channels for m in torch.load(entry.output)["model"].modules() if isinstance(m, torch.nn.Conv2d)]
    assert (sum(widths) < sum(dense_widths)) is pruned and len(widths) == len(dense_widths)
    assert torch.load(entry.output)["prune"]["deploy_imgsz"] == 32
    assert entry.eval["imgsz"] == 32  # the written file is validated at the size it deploys at
    assert f"python export.py --weights {entry.output} --img 32 --include onnx" in caplog.text
    if pruned:  # the export (the same code either way): in the run, and by `yolo-prune export` without --img
        [onnx_file] = [a["path"] for a in entry.exports]
        dims = [d.dim_value for d in onnx.load(onnx_file).graph.input[0].type.tensor_type.shape.dim]
        assert dims == [1, 3, 32, 32]
        capsys.readouterr()
        assert main(["export", "--weights", entry.output, "--include", "onnx", "--overwrite"]) == 0
        assert "Exporting at --img 32: the input size the budget search chose" in capsys.readouterr().out
