"""``structure: channel`` + ``schedule:``: channels removed at step epochs inside YOLOv5's real training loop.

One real ``train.main`` run (synthetic data, 4 train / 2 val images at 64 px, YOLOv5n at width 0.125, 3 epochs,
channel steps at epochs 1 and 2) is shared by the tests; probes registered on the same ``Callbacks`` read YOLOv5's
live optimizer, model and EMA from ``train()``'s frame during training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from yolo_prune_plugin.backend.training_loop import replace_optimizer_params, training_objects
from yolo_prune_plugin.api import run_training, train_opt
from yolo_prune_plugin.callbacks import register
from yolo_prune_plugin.training.channel_schedule import ChannelSchedule, apply_kept_channels
from yolo_prune_plugin.config import config_from_dict
from yolo_prune_plugin.errors import ConfigError, PruneError
from yolo_prune_plugin.prune.unstructured import conv_layers
from yolo_prune_plugin.training.schedule import schedule_amount
from yolo_prune_plugin.report import validate_report
from yolo_prune_plugin.prune.channel import channel_counts, channel_prune

from testkit import plain_attempt_load, seeded_rand

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE = {"start_epoch": 0, "end_epoch": 2, "every": 1, "final_amount": 0.5}  # steps: 0 (target 0), 1, 2
CONFIG = {"structure": "channel", "schedule": SCHEDULE, "channel": {"round_to": 4}}




def _opt(backend, data, cfg, project, name, epochs=3, **kw):
    return train_opt([], backend, data=str(data), cfg=str(cfg), weights="", imgsz=64, epochs=epochs, batch_size=4,
                     device="cpu", workers=0, noplots=True, noautoanchor=True, project=str(project), name=name, **kw)


def _conv_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for _, m in conv_layers(model))


class Probe:
    """Reads YOLOv5's live objects at the first batch of every epoch (after the plugin's epoch-start step)."""

    def __init__(self, backend):
        self.backend = backend
        self.epochs: list[dict] = []
        self.losses: dict[int, list[float]] = {}
        self._epoch = -1
        self._snap: dict = {}

    def epoch_start(self):
        self._epoch += 1
        self._first = True

    def batch_start(self):
        if not self._first:
            return
        self._first = False
        o = training_objects(self.backend)
        opt_ids = [id(p) for g in o.optimizer.param_groups for p in g["params"]]
        groups = {id(p): i for i, g in enumerate(o.optimizer.param_groups) for p in g["params"]}
        model_params = dict(o.model.named_parameters())
        self.epochs.append({
            "epoch": self._epoch, "channels": channel_counts(o.model), "ema_channels": channel_counts(o.ema.ema),
            "same_ids": sorted(opt_ids) == sorted(id(p) for p in model_params.values()),
            "no_duplicates": len(opt_ids) == len(set(opt_ids)),
            "stale_state": [k for k in o.optimizer.state if id(k) not in set(map(id, model_params.values()))],
            # smart_optimizer's layout: biases (0), conv weights with decay (1), BatchNorm weights (2)
            "groups_ok": all(groups[id(p)] == (0 if n.endswith(".bias") else 2 if ".bn." in n else 1)
                             for n, p in model_params.items()),
            "ema_frozen": not any(p.requires_grad for p in o.ema.ema.parameters()),
        })
        self._snap = {n: p.detach().clone() for n, p in model_params.items()}
        self._model = o.model

    def batch_end(self, model, ni, imgs, targets, paths, mloss):
        self.losses.setdefault(self._epoch, []).append(float(sum(mloss)))

    def epoch_end(self, epoch=None):  # the kept weights trained: the optimizer updates the new tensors
        now = dict(self._model.named_parameters())
        moved = sum(int((now[n].detach() != v).sum()) for n, v in self._snap.items() if now[n].shape == v.shape)
        self.epochs[-1]["moved"] = moved / sum(v.numel() for v in self._snap.values())


@pytest.fixture(scope="module")
def run(backend, tiny_data, tiny_cfg, tmp_path_factory):
    project = tmp_path_factory.mktemp("runs")
    opt = _opt(backend, tiny_data, tiny_cfg, project, "chsched")
    probe = Probe(backend)
    cb = backend.Callbacks()
    for hook, fn in (("on_train_epoch_start", probe.epoch_start), ("on_train_batch_start", probe.batch_start),
                     ("on_train_batch_end", probe.batch_end), ("on_train_epoch_end", probe.epoch_end)):
        cb.register_action(hook, name="probe", callback=fn)
    torch.manual_seed(0)
    plugin = run_training(opt, config_from_dict({**CONFIG, "bench": True}), backend, callbacks=cb)
    return plugin, Path(opt.save_dir), probe


def test_channel_schedule_prunes_at_steps_and_keeps_optimizer_and_ema_in_step(run):
    plugin, save_dir, probe = run
    assert plugin.mode == "schedule" and isinstance(plugin.gradual, ChannelSchedule)
    assert plugin.error is None and plugin.ran
    steps = plugin.gradual.steps
    assert [s["epoch"] for s in steps] == [1, 2]  # epoch 0's cubic target is 0
    dense_w = plugin.entries[0].channels["conv_weights_before"]
    for s in steps:  # each step reaches its own target of the DENSE count (not compounded)
        target = schedule_amount(s["epoch"], plugin.config.schedule)
        assert s["target"] == pytest.approx(target)
        assert abs(s["removed"] - target) <= 0.02
        assert s["removed"] == pytest.approx(1 - s["conv_weights"] / dense_w, abs=1e-6)
        assert s["parameters_replaced"] > 0
    assert steps[1]["conv_weights"] < steps[0]["conv_weights"]
    e0, e1, e2 = probe.epochs
    assert e0["channels"] != e1["channels"] != e2["channels"]  # narrower after each step
    for e in probe.epochs:  # after every step: no stale tensor anywhere in YOLOv5's optimizer
        assert e["same_ids"] and e["no_duplicates"] and e["groups_ok"] and e["ema_frozen"], e
        assert e["stale_state"] == [] and e["channels"] == e["ema_channels"]
    # the new tensors really train (epoch 0's one step is YOLOv5's first warmup step: weight lr 0, biases only)
    assert e1["moved"] > 0.9 and e2["moved"] > 0.9
    for epoch in (1, 2):
        assert all(math.isfinite(v) and v > 0 for v in probe.losses[epoch])
    assert [r["epoch"] for r in plugin.history] == [0, 1, 2]
    assert plugin.history[2]["removed"] == plugin.history[2]["ema_removed"] == steps[1]["removed"]


def test_best_pruned_holds_the_final_channels_and_report_matches(run, backend):
    plugin, save_dir, _ = run
    w = save_dir / "weights"
    final = torch.load(w / "best_pruned.pt")  # weights_only: plain YOLOv5 classes only
    model = final["model"]
    assert final["ema"] is None and next(model.parameters()).dtype == torch.float16
    dense = plugin.gradual._dense
    counts = channel_counts(model)
    assert counts != dense["channels"] and all(counts[n][0] <= dense["channels"][n][0] for n in counts)
    assert sum(c[0] for c in counts.values()) < sum(c[0] for c in dense["channels"].values())
    removed = 1 - _conv_weights(model) / dense["conv_weights"]
    assert abs(removed - 0.5) <= 0.02
    assert not (w / ".best_pruned_candidate.pt").exists()

    report = json.loads((save_dir / "prune_report.json").read_text())
    [entry] = validate_report(report)
    assert report["mode"] == entry.mode == "schedule" and entry.structure == "channel" and entry.amount == 0.5
    ch = entry.channels
    assert {n: v["after"] for n, v in ch["channels"].items()} == counts
    assert {n: v["before"] for n, v in ch["channels"].items()} == dense["channels"]
    assert ch["achieved"] == pytest.approx(removed, abs=1e-6) and ch["importance"] == "l1"
    assert ch["params_after"] < ch["params_before"] and ch["gflops_after"] < ch["gflops_before"]
    assert final["prune"]["channels"] == ch and final["prune"]["mode"] == "schedule"
    assert entry.schedule["source_epoch"] >= 2 and entry.metrics_after is not None
    dense_row = next(r for r in report["history"] if r["epoch"] == 0)  # epoch 0 trained at full width
    assert entry.metrics_before_source.startswith("epoch 0 (dense")
    assert entry.metrics_before["mAP50-95"] == pytest.approx(dense_row["mAP50-95"])
    assert entry.sparsity_after["parameters"] == ch["params_after"]
    last = torch.load(w / "last.pt")["model"]  # YOLOv5's own last.pt (stripped: the EMA): the final architecture
    assert channel_counts(last) == counts
    assert backend.attempt_load(w / "best_pruned.pt", "cpu")(torch.zeros(1, 3, 64, 64))[0].shape[-1] == 8


def test_bench_compares_the_pruned_file_with_the_dense_starting_weights(run):
    """bench: true in schedule mode: the baseline is the dense model of on_train_start (a temporary file), not
    last.pt (already pruned). Ratios only: the pruned file has far fewer params and GFLOPs."""
    plugin, save_dir, _ = run
    [entry] = validate_report(json.loads((save_dir / "prune_report.json").read_text()))
    ref, pruned = entry.bench
    assert pruned["name"] == "best_pruned.pt" and ref["name"] != "last.pt"
    assert ref["reference"].startswith("dense starting weights (snapshot at on_train_start") and ref["file"] is None
    assert ref["params"] > 1.5 * pruned["params"] and ref["gflops"] > 1.5 * pruned["gflops"]
    assert ref["onnx_bytes"] > pruned["onnx_bytes"]
    ch = entry.channels  # the same ratio as the report's own dense-vs-pruned comparison (BatchNorm fused in bench)
    assert ref["params"] / pruned["params"] == pytest.approx(ch["params_before"] / ch["params_after"], rel=0.1)


def test_best_pruned_loads_in_plain_yolov5_in_a_fresh_process(run):
    plugin, save_dir, _ = run
    path = save_dir / "weights" / "best_pruned.pt"
    shape, widths = plain_attempt_load(path)
    assert shape[-1] == 8  # 5 + 3 classes
    assert widths == [c["after"][0] for c in plugin.entries[0].channels["channels"].values()]


# ---------------------------------------------------------------------------------------------------
# the pieces, without training
# ---------------------------------------------------------------------------------------------------
def test_apply_kept_channels_removes_the_same_channels_from_a_copy(backend, tiny_cfg):
    import copy

    torch.manual_seed(0)
    a = backend.yolo.Model(str(tiny_cfg), ch=3, nc=3).eval()
    b = copy.deepcopy(a)
    res = channel_prune(a, 0.4, importance="l1", round_to=4, imgsz=64, log=False)
    apply_kept_channels(b, res.kept)
    assert channel_counts(a) == channel_counts(b) != res.channels_before
    x = seeded_rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(a(x)[0], b(x)[0])  # same channels kept, not just the same counts


def test_replace_optimizer_params_keeps_groups_and_drops_stale_state(backend, tiny_cfg):
    torch.manual_seed(0)
    model = backend.yolo.Model(str(tiny_cfg), ch=3, nc=3).train()
    opt = backend.train.smart_optimizer(model, "SGD", 0.01, 0.9, 5e-4)
    sum(o.float().pow(2).mean() for o in model(seeded_rand(2, 3, 64, 64))).backward()
    opt.step()
    before = dict(model.named_parameters())
    group_of = {n: i for n, p in before.items() for i, g in enumerate(opt.param_groups)
                if any(p is q for q in g["params"])}
    model.eval()
    channel_prune(model, 0.4, importance="l1", round_to=4, imgsz=64, log=False)
    after = dict(model.named_parameters())
    replaced = {id(before[n]): p for n, p in after.items() if p is not before[n]}
    assert replaced and len(replaced) < len(after)
    assert replace_optimizer_params(opt, replaced) == len(replaced)
    for n, p in after.items():
        g = opt.param_groups[group_of[n]]
        assert any(p is q for q in g["params"])  # same group as before
        assert (id(before[n]) in replaced) == (p not in opt.state)  # state dropped exactly for the new tensors
    model.train()
    sum(o.float().pow(2).mean() for o in model(seeded_rand(2, 3, 64, 64))).backward()
    opt.step()  # runs with the new shapes, momentum restarts for them


def test_a_failed_step_leaves_model_ema_and_optimizer_untouched(backend, tiny_cfg):
    """round_to larger than any layer (steps not capped by round_share): the amount cannot be met; the step raises
    and changes nothing."""
    torch.manual_seed(0)
    model = backend.yolo.Model(str(tiny_cfg), ch=3, nc=3).train()
    optimizer = backend.train.smart_optimizer(model, "SGD", 0.01, 0.9, 5e-4)
    ema = backend.train.ModelEMA(model)
    cfg = config_from_dict({**CONFIG, "channel": {"round_to": 256, "round_share": 1.0}})
    sched = ChannelSchedule(cfg, backend)

    def train(model, optimizer, ema, start_epoch=0, imgsz=64):  # stands in for YOLOv5's train(): locals are read
        sched.train_start()

    train(model, optimizer, ema)
    params = [id(p) for g in optimizer.param_groups for p in g["params"]]
    counts, ema_model = channel_counts(model), ema.ema
    sched.epoch_start()  # epoch 0: target 0, nothing to do
    with pytest.raises(PruneError, match="cannot remove"):
        sched.epoch_start()  # epoch 1
    assert channel_counts(model) == channel_counts(ema.ema) == counts and ema.ema is ema_model
    assert [id(p) for g in optimizer.param_groups for p in g["params"]] == params and sched.steps == []


def test_resume_is_refused_before_training(backend):
    from yolo_prune_plugin.api import preflight

    opt = train_opt([], backend, resume=True)
    with pytest.raises(ConfigError, match="cannot --resume"):
        preflight(opt, config_from_dict(CONFIG), backend)
    preflight(opt, config_from_dict({"schedule": SCHEDULE}), backend)  # unstructured: resumes as before


def test_channel_schedule_config_is_accepted():
    cfg = config_from_dict({"amount": 0.5, **CONFIG})
    assert cfg.structure == "channel" and cfg.schedule.final_amount == 0.5


@pytest.mark.parametrize("cfg,env,opt_kw,match", [
    ({**CONFIG, "channel": {"importance": "taylor"}}, {}, {}, "needs a labelled batch"),
    (CONFIG, {"WORLD_SIZE": "2"}, {}, "cannot run under DDP"),
    (CONFIG, {}, {"resume": True}, "cannot --resume"),
    ({**CONFIG, "schedule": {**SCHEDULE, "end_epoch": 5}}, {}, {}, "end_epoch"),
    ({**CONFIG, "method": "lamp"}, {}, {}, "choose 'channel.importance'"),
])
def test_register_rejects_unusable_channel_schedules(backend, monkeypatch, cfg, env, opt_kw, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    callbacks = backend.Callbacks()
    with pytest.raises(ConfigError, match=match):
        register(callbacks, config_from_dict(cfg), opt=train_opt([], backend, epochs=5, **opt_kw))
    assert not any(callbacks.get_registered_actions(h) for h in callbacks._callbacks)
