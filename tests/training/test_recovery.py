"""Prune-aware fine-tuning of a finished checkpoint: ``finetune.recipe: regularize`` (training/recovery.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from yolo_prune_plugin.cli import main
from yolo_prune_plugin.config import config_from_dict
from yolo_prune_plugin.errors import ConfigError
from yolo_prune_plugin.prune.channel import channel_prune
from yolo_prune_plugin.report import validate_report
from yolo_prune_plugin.training.channel_regularize import regularize_targets
from yolo_prune_plugin.training.recovery import bn_residual, output_change, phase_epochs

from testkit import assert_plain_yolov5, config_from_flags, plain_attempt_load, save_checkpoint, seeded_rand

pytestmark = pytest.mark.usefixtures("one_thread")

CHANNEL = {"structure": "channel", "amount": 0.3}


@pytest.fixture
def planned(small_model):
    """(model with trained-like BatchNorm shifts, config, the l1 plan's BatchNorm targets, the plan)."""
    cfg = config_from_dict({**CHANNEL, "channel": {"importance": "l1"}})
    for m in small_model.modules():  # a trained model's shifts are not 0 (random init has beta = 0)
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.bias, 0.5, 1.5)
    targets, plan = regularize_targets(small_model, cfg)
    return small_model, cfg, targets, plan


@pytest.mark.parametrize("epochs,share,recipe,split", [
    (10, 0.5, "regularize", (5, 5)), (3, 0.5, "regularize", (2, 1)), (1, 0.5, "regularize", (1, 0)),
    (0, 0.5, "regularize", (0, 0)), (10, 0.0, "regularize", (0, 10)), (10, 1.0, "regularize", (10, 0)),
    (10, 0.5, "plain", (0, 10)),
])
def test_phase_split(epochs, share, recipe, split):
    cfg = config_from_dict({**CHANNEL, "finetune": {"epochs": epochs, "recipe": recipe, "regularize_share": share}})
    assert phase_epochs(cfg) == split


@pytest.mark.parametrize("data,match", [
    ({**CHANNEL, "finetune": {"epochs": 4, "recipe": "magic"}}, "'finetune.recipe' must be one of plain, regularize"),
    ({**CHANNEL, "finetune": {"epochs": 4, "regularize_share": 1.5}}, r"'finetune.regularize_share' must be in \[0, 1\]"),
    ({**CHANNEL, "finetune": {"epochs": 4, "regularize_share": -0.1}}, r"'finetune.regularize_share' must be in"),
    ({**CHANNEL, "finetune": {"epochs": -1}}, "'finetune.epochs' must be >= 0"),
    ({**CHANNEL, "finetune": {"epochs": 4, "regularize_weight": 0}}, r"'finetune.regularize_weight' must be in \(0, 1\)"),
    ({"amount": 0.3, "finetune": {"epochs": 4, "recipe": "regularize"}}, "'finetune.recipe: regularize' .* needs "
     "'structure: channel'"),
    ({**CHANNEL, "finetune": {"epochs": 4, "recipe": "regularize"}, "channel": {"regularize": {"weight": 0.1}}},
     "both train the plan away"),
])
def test_bad_recipe_values_are_one_line_errors(data, match):
    with pytest.raises(ConfigError, match=match) as e:
        config_from_dict(data)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("prefix", ["", "prune-"])
@pytest.mark.parametrize("recipe,match", [("regularize", None), ("magic", "must be one of plain, regularize")])
def test_recipe_flag(prefix, recipe, match):
    argv = ["train" if prefix else "prune", *([] if prefix else ["--weights", "w.pt"]), f"--{prefix}structure",
            "channel", f"--{prefix}amount", "0.3", f"--{prefix}finetune-epochs", "4", f"--{prefix}finetune-recipe",
            recipe]
    cfg = config_from_flags(argv, prefix, match)
    assert match or (cfg.finetune.recipe == "regularize" and phase_epochs(cfg) == (2, 2))


def test_a_plan_gives_the_penalty_every_channel_the_removal_takes(planned):
    """The penalty phase targets the BatchNorm channels of the plan's whole groups (not only each root conv), the
    same ones the plan's own ranking targeted; once they are at zero, removing the plan leaves the outputs as
    they were (`output_change`), and the residual says so."""
    model, cfg, ranked, plan = planned
    model.eval()
    targets, again = regularize_targets(model, cfg, plan)
    assert again == {k: sorted(v) for k, v in plan.items()}
    assert {k: v.tolist() for k, v in targets.items()} == {k: v.tolist() for k, v in ranked.items()}
    assert len(targets) > len(plan)  # group members beyond the roots lose the same channels
    x = seeded_rand(2, 3, 64, 64)
    removed = copy.deepcopy(model)
    channel_prune(removed, 0.3, plan=plan, imgsz=64, log=False)
    assert output_change(model, removed, x) > 0.05  # live channels: removing them changes the model
    before = bn_residual(model, targets)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for bn, idx in targets.items():
            mods[bn].weight[idx] = 0.0
            mods[bn].bias[idx] = 0.0
    after = bn_residual(model, targets)
    assert before["alive"] == before["channels"] > 0 and after == {**after, "l1": 0.0, "alive": 0}
    removed = copy.deepcopy(model)
    channel_prune(removed, 0.3, plan=plan, imgsz=64, log=False)
    assert output_change(model, removed, x) < 1e-5


@pytest.mark.parametrize("epochs,split", [(1, (1, 0)), (2, (1, 1))])
def test_regularize_recipe_end_to_end(backend, tiny_model, tiny_data, tmp_path, caplog, epochs, split):
    """`yolo-prune prune --finetune-recipe regularize` on a real tiny `train.main`: the penalty phase trains the dense
    model (only the plan's channels penalised and faded: their scale+shift reach 0 in the saved last.pt, model and
    EMA), exactly that plan is removed without changing the outputs, and the
    rest of the epochs fine-tune the smaller model; the phase split, residual and removal change are in the
    report, and the written file loads in plain YOLOv5 with the pruned architecture."""
    import logging

    caplog.set_level(logging.INFO, logger="yolo_prune_plugin")
    w = save_checkpoint(tiny_model, tmp_path / "best.pt")
    cfg = tmp_path / "p.yaml"
    cfg.write_text("finetune: {regularize_weight: 0.9, lr_scale: 1.0}\nchannel: {importance: l1}\n"
                   "bn_recalibration: {images: 0}\n")
    rc = main(["prune", "--weights", str(w), "--data", str(tiny_data), "--img", "64", "--device", "cpu",
               "--workers", "0", "--batch-size", "2", "--structure", "channel", "--amount", "0.3", "--config",
               str(cfg), "--finetune-epochs", str(epochs), "--finetune-recipe", "regularize"])
    assert rc == 0
    entry = validate_report(json.loads((tmp_path / "prune_report.json").read_text()))[0]
    ft = entry.finetune
    assert ft["recipe"] == "regularize" and ft["epochs"] == epochs
    assert (ft["split"]["regularize_epochs"], ft["split"]["finetune_epochs"]) == split
    pen = ft["phases"]["regularize"]
    assert pen["epochs"] == 1 and pen["run"].endswith("best_regularize") and pen["source"].endswith("last.pt")
    assert pen["history"][0]["regularize_channels"] == pen["residual"]["before"]["channels"] > 0
    assert pen["residual"]["before"]["alive"] > 0 and pen["fade_batches"] == 2  # 4 images, batch 2, 1 epoch
    assert pen["residual"]["after"]["l1"] == 0 and pen["residual"]["after"]["alive"] == 0  # faded to exactly 0
    assert pen["removal_output_change"] < 1e-4 and pen["metrics_removed"] is not None  # removal is lossless
    assert "planned channels' BatchNorm |scale|+|shift|" in caplog.text
    if split[1]:
        assert ft["phases"]["finetune"]["epochs"] == 1 and ft["run"].endswith("best_finetune")
    else:
        assert ft["phases"]["finetune"] is None and ft["source"] == pen["source"]
    out = torch.load(entry.output, weights_only=False)
    assert out["prune"]["finetune"]["split"] == ft["split"]
    widths = [m.out_channels for m in out["model"].modules() if isinstance(m, torch.nn.Conv2d)]
    dense = [m.out_channels for m in tiny_model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(widths) < sum(dense)
    assert_plain_yolov5(out["model"])
    shape, fused = plain_attempt_load(entry.output)  # plain YOLOv5 loads it, pruned architecture and all
    assert shape[-1] == 8 and fused == [c["after"][0] for c in entry.channels["channels"].values()]


def test_a_fixed_plan_fades_to_zero_and_nothing_else_moves(planned):
    """The penalty phase's fade (`ChannelRegularizer(plan=...)`, after every batch): the plan's BatchNorm scales and
    shifts follow 1 - b/B in the model and its EMA and are exactly 0 after the last batch; no other parameter is
    touched."""
    from types import SimpleNamespace

    from yolo_prune_plugin.training.channel_regularize import ChannelRegularizer

    model, cfg, _, plan = planned
    model.train()
    ema = SimpleNamespace(ema=copy.deepcopy(model))
    reg = ChannelRegularizer(cfg, plan=plan, weight=0.1)
    reg.attach(model, torch.optim.SGD(model.parameters(), lr=0.0), start_epoch=0)
    reg.ema, reg.batches = ema, 4
    reg.epoch_start()
    assert reg.targets and reg.reg.from_epoch == 0 and reg.reg.weight == 0.1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    targeted = {f"{bn}.{p}": idx for bn, idx in reg.targets.items() for p in ("weight", "bias")}
    for b in range(1, 5):
        reg.batch_end()
        for net in (model, ema.ema):
            params = dict(net.named_parameters())
            for n, idx in targeted.items():
                assert torch.allclose(params[n].detach()[idx], before[n][idx] * (1 - b / 4), atol=1e-6), (n, b)
    for n, p in model.named_parameters():
        keep = torch.ones_like(p, dtype=torch.bool)
        if n in targeted:
            keep[targeted[n]] = False
            assert torch.equal(p.detach()[~keep], torch.zeros_like(p.detach()[~keep]))
        assert torch.equal(p.detach()[keep], before[n][keep]), f"{n}: moved but not in the plan"
    reg.close()


def test_regularize_recipe_at_train_end(backend, tiny_data, tiny_cfg, tmp_path):
    """The train-end hook (`yolo-prune train --prune-finetune-recipe regularize`, here through `run_training`, the
    same registration): after YOLOv5's own training the penalty phase trains best.pt (run `<run>_regularize` beside
    the run), exactly the plan is removed, the rest fine-tunes (`<run>_finetune`); the report names the file kept."""
    from pathlib import Path

    from yolo_prune_plugin.api import run_training

    from testkit import tiny_train_opt

    opt = tiny_train_opt(backend, tiny_data, tiny_cfg, tmp_path, "exp")
    cfg = config_from_dict({**CHANNEL, "channel": {"importance": "l1"}, "bn_recalibration": {"images": 0},
                            "finetune": {"epochs": 2, "recipe": "regularize", "regularize_weight": 0.9}})
    plugin = run_training(opt, cfg, backend)
    assert plugin.error is None and plugin.ran
    run = Path(opt.save_dir)
    report = validate_report(json.loads((run / "prune_report.json").read_text()))
    ft = report[0].finetune
    assert ft["split"] == {"regularize_epochs": 1, "finetune_epochs": 1, "share": 0.5}
    pen = ft["phases"]["regularize"]
    assert pen["run"] == str(tmp_path / "exp_regularize") and ft["run"] == str(tmp_path / "exp_finetune")
    assert pen["residual"]["after"]["alive"] == 0 and pen["removal_output_change"] < 1e-4
    assert ft["kept"]["file"] == "last.pt" and ft["source"] == str(tmp_path / "exp_finetune" / "weights" / "last.pt")
    shape, _ = plain_attempt_load(report[0].output)
    assert shape[-1] == 8
