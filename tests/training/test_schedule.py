"""training/ (finetune, masks, schedule): masked fine-tuning after pruning and gradual pruning, inside YOLOv5's real training loop.

Real ``train.main`` runs use the synthetic dataset (4 train / 2 val images at 64 px) and a narrow YOLOv5n
(width 0.125) so that each run takes seconds; their mAP is meaningless, the zeros are what is checked.
"""

from __future__ import annotations

import gc
import json
import math
import weakref
from pathlib import Path

import pytest
import torch

from yolo_prune_plugin.training import schedule as S
from yolo_prune_plugin.backend.loading import load_checkpoint
from yolo_prune_plugin.api import run_training, train_opt
from yolo_prune_plugin.callbacks import register
from yolo_prune_plugin.config import ScheduleOptions, config_from_dict
from yolo_prune_plugin.errors import ConfigError
from yolo_prune_plugin.prune.unstructured import prune_model, sparsity_stats
from yolo_prune_plugin.report import validate_report

from testkit import assert_plain_yolov5, assert_yolov5_restored, save_checkpoint, tiny_train_opt


# ---------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


# ---------------------------------------------------------------------------------------------------
# schedule arithmetic
# ---------------------------------------------------------------------------------------------------
def _cubic(e, start, end, final):  # independent restatement of Zhu & Gupta (2017)
    if e < start:
        return 0.0
    if e >= end:
        return final
    return final + (0.0 - final) * (1 - (e - start) / (end - start)) ** 3


@pytest.mark.parametrize("start,end,every,final,expected", [
    (0, 2, 1, 0.5, [0.0, 0.4375, 0.5, 0.5, 0.5]),
    (1, 5, 2, 0.8, [0.0, 0.0, 0.0, 0.7, 0.7, 0.8, 0.8]),       # steps at 1, 3 and the end 5
    (0, 4, 3, 0.6, [0.0, 0.0, 0.0, 0.6 * (1 - (1 / 4) ** 3), 0.6, 0.6]),  # steps at 0, 3 and the end 4
    (3, 3, 1, 0.6, [0.0, 0.0, 0.0, 0.6, 0.6]),                  # start == end: one step to the final value
])
def test_schedule_amount_follows_cubic_steps(start, end, every, final, expected):
    s = ScheduleOptions(start_epoch=start, end_epoch=end, final_amount=final, every=every)
    got = [S.schedule_amount(e, s) for e in range(len(expected))]
    assert got == pytest.approx(expected, abs=1e-12)
    steps = [e for e in range(len(expected)) if S.is_step_epoch(e, s)]
    assert steps == sorted({*range(start, end + 1, every), end})
    for e in steps:  # at a step the value is the cubic itself
        assert S.schedule_amount(e, s) == pytest.approx(_cubic(e, start, end, final), abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# the optimizer hooks on YOLOv5's own optimizer and EMA
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# gradual pruning (real train.main through api.run_training, as `yolo-prune train` runs it)
# ---------------------------------------------------------------------------------------------------
def test_schedule_prunes_along_the_cubic_during_training(backend, tiny_data, tiny_cfg, tmp_path):
    s = {"start_epoch": 0, "end_epoch": 2, "every": 1, "final_amount": 0.5}
    cfg = config_from_dict({"schedule": s})
    opt = tiny_train_opt(backend, tiny_data, tiny_cfg, tmp_path, "sched", epochs=3)
    plugin = run_training(opt, cfg, backend)
    assert plugin.mode == "schedule" and plugin.error is None and plugin.ran
    assert_yolov5_restored(backend)
    sched = ScheduleOptions(**s)
    total = plugin.entries[0].sparsity_after["conv_weights"]
    # masks recomputed at epochs 1 and 2 (epoch 0's target is 0) with exactly round(s_e * total) zeros
    assert [(st["epoch"], st["zeros"]) for st in plugin.gradual.steps] == [(e, round(_cubic(e, 0, 2, 0.5) * total))
                                                                  for e in (1, 2)]
    assert [st["target"] for st in plugin.gradual.steps] == pytest.approx([0.4375, 0.5])
    for row in plugin.history:  # model and EMA at every epoch end
        want = round(S.schedule_amount(row["epoch"], sched) * total) / total
        assert row["sparsity"] == pytest.approx(want, abs=2e-6) and row["ema_sparsity"] == pytest.approx(want, abs=2e-6)
        assert set((row.get("leaked") or {0: 0}).values()) == {0} and row.get("leaked_saved", 0) == 0

    w = Path(opt.save_dir) / "weights"
    final = torch.load(w / "best_pruned.pt")
    assert final["ema"] is None and next(final["model"].parameters()).dtype == torch.float16
    assert_plain_yolov5(final["model"])
    st = sparsity_stats(final["model"])
    assert st.zeros == round(0.5 * st.weights)  # exactly the final sparsity
    entry = final["prune"]
    assert entry["schedule"]["source_epoch"] >= 2 and set(entry["leaks"].values()) == {0}
    assert entry["metrics_after"] is not None
    last = sparsity_stats(load_checkpoint(w / "last.pt")["model"])
    assert last.zeros == st.zeros  # the final epoch's EMA is as sparse
    assert not (w / ".best_pruned_candidate.pt").exists()
    report = json.loads((Path(opt.save_dir) / "prune_report.json").read_text())
    assert report["mode"] == "schedule" and [h["epoch"] for h in report["history"]] == [0, 1, 2]
    validate_report(report)
    # "before" = epoch 0, the last epoch trained dense (the first step with a target > 0 is epoch 1), not the
    # pruned candidate validated again
    assert entry["schedule"]["dense_epoch"] == 0 and entry["metrics_before_source"].startswith("epoch 0 (dense")
    assert entry["metrics_before"]["mAP50-95"] == pytest.approx(report["history"][0]["mAP50-95"])
    assert backend.attempt_load(w / "best_pruned.pt", "cpu")(torch.zeros(1, 3, 64, 64))[0].shape[-1] == 8


@pytest.mark.parametrize("start,end,every,first", [(0, 2, 1, 1), (0, 0, 1, 0), (2, 20, 1, 3), (0, 20, 5, 5),
                                                    (3, 5, 10, 5)])
def test_first_pruned_epoch_is_the_first_step_with_a_target(start, end, every, first):
    s = ScheduleOptions(start_epoch=start, end_epoch=end, final_amount=0.5, every=every)
    assert S.first_pruned_epoch(s) == first
    assert all(S.schedule_amount(e, s) == 0 for e in range(first)) and S.schedule_amount(first, s) > 0


def test_schedule_without_a_dense_epoch_validates_the_dense_starting_weights(backend, tiny_data, tiny_cfg, tmp_path,
                                                                            monkeypatch):
    """start_epoch == end_epoch == 0: epoch 0 already trains pruned, so no epoch of the history is dense. The
    "before" metrics must come from the model as it was at on_train_start, not from the pruned candidate."""
    import yolo_prune_plugin.pipeline as P
    from yolo_prune_plugin.training.dense_reference import DenseReference

    seen = []

    def spy(model, settings, *a, **k):  # the real validation, recording how sparse the validated model is
        seen.append(sparsity_stats(model).sparsity)
        return real(model, settings, *a, **k)

    real = P.evaluate
    monkeypatch.setattr(P, "evaluate", spy)
    snaps = []
    real_capture = DenseReference.capture

    def capture(self, model, start_epoch):  # the real snapshot, seen (weakly) from here
        real_capture(self, model, start_epoch)
        snaps.append((weakref.ref(self.model), sparsity_stats(self.model).sparsity,
                      next(self.model.parameters()).device.type))

    monkeypatch.setattr(DenseReference, "capture", capture)
    cfg = config_from_dict({"schedule": {"start_epoch": 0, "end_epoch": 0, "final_amount": 0.5}})
    opt = tiny_train_opt(backend, tiny_data, tiny_cfg, tmp_path, "sched0", epochs=1)
    torch.manual_seed(0)
    plugin = run_training(opt, cfg, backend)
    assert plugin.error is None and plugin.ran
    assert len(seen) == 1 and seen[0] < 0.01, seen  # the dense snapshot was validated (the candidate: 50 % zeros)
    assert [st["epoch"] for st in plugin.gradual.steps] == [0] and plugin.gradual.dense.dense_epoch == -1
    report = json.loads((Path(opt.save_dir) / "prune_report.json").read_text())
    [entry] = validate_report(report)
    assert entry.metrics_before is not None and entry.sparsity_after["sparsity"] == pytest.approx(0.5, abs=1e-5)
    assert entry.metrics_before_source.startswith("dense starting weights (snapshot at on_train_start, epoch 0")
    assert "validated by the plugin" in entry.metrics_before_source and "no dense epoch" in entry.metrics_before_source
    [(snap, sparsity, device)] = snaps  # the starting weights: dense, on the CPU, not the weights training ended with
    assert sparsity < 0.01 and device == "cpu"
    gc.collect()
    assert plugin.gradual.dense.model is None and snap() is None  # released: the plugin keeps no model copy


def test_resumed_schedule_reports_before_as_absent_with_the_reason(backend, tiny_model, tiny_data, tmp_path, caplog):
    """A run resumed after pruning began has no dense weights: "before" is absent with the reason, and the pipeline
    never validates the (pruned) source in its place; the bench baseline is the dense architecture from the YAML."""
    from yolo_prune_plugin import pipeline
    from yolo_prune_plugin.training.dense_reference import DenseReference
    from yolo_prune_plugin.report import format_table

    prune_model(tiny_model, 0.5, log=False)
    dense = DenseReference(first_pruned=1)
    dense.capture(tiny_model, start_epoch=2)  # resumed at epoch 2: the weights are already 50 % zeros
    before = dense.before([{"epoch": 2, "P": 0.1, "R": 0.1, "mAP50": 0.1, "mAP50-95": 0.1}])
    assert before.metrics is None and before.reference is None and dense.model is None
    assert before.source.startswith("absent: epoch 0 is the last dense epoch") and "resumed at epoch 2" in before.source
    last = save_checkpoint(tiny_model, tmp_path / "last.pt")
    cfg = config_from_dict({"schedule": {"start_epoch": 0, "end_epoch": 1, "final_amount": 0.5}, "bench": True})
    ctx = pipeline.context_from_opt({"data": str(tiny_data), "imgsz": 64, "batch_size": 2, "device": "cpu",
                                     "workers": 0}, cfg, backend)
    ckpt = load_checkpoint(last)
    with caplog.at_level("WARNING", logger="yolo_prune_plugin"):
        entry = pipeline.run(last, cfg, ctx, ckpt=ckpt, pruned=ckpt["model"], mode="schedule",
                             out=tmp_path / "best_pruned.pt", schedule={"dense_stats": None}, before=before.metrics,
                             before_source=before.source, reference=before.reference)
    assert entry.metrics_before is None and entry.metrics_after is not None
    assert entry.metrics_before_source == before.source and "no 'before' metrics: absent" in caplog.text
    assert "(before: absent: epoch 0" in format_table(entry.to_dict())
    ref, pruned = entry.bench
    assert ref["reference"].startswith("dense architecture rebuilt from the checkpoint's model YAML")
    assert ref["params"] == pruned["params"] and ref["gflops"] == pytest.approx(pruned["gflops"])  # zeros only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_pruned.pt", "last.pt"]


# ---------------------------------------------------------------------------------------------------
# rejected before training
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,env,opt_epochs,match", [
    ({"method": "obs", "schedule": {"end_epoch": 2, "final_amount": 0.5}}, {}, 5, "data-aware"),
    ({"schedule": {"end_epoch": 5, "final_amount": 0.5}}, {}, 5, "end_epoch"),
])
def test_register_rejects_unusable_configs(backend, monkeypatch, cfg, env, opt_epochs, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    callbacks = backend.Callbacks()
    with pytest.raises(ConfigError, match=match):
        register(callbacks, config_from_dict(cfg), opt=train_opt([], backend, epochs=opt_epochs))
    assert not any(callbacks.get_registered_actions(h) for h in callbacks._callbacks)


def test_cubic_sparsity_edges():
    assert S.cubic_sparsity(-1, 0, 4, 0.9) == 0.0 and S.cubic_sparsity(9, 0, 4, 0.9) == 0.9
    assert S.cubic_sparsity(2, 0, 4, 0.8) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert math.isclose(S.cubic_sparsity(4, 4, 4, 0.3), 0.3)


