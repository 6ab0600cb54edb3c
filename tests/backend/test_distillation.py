"""finetune.distill: the dense model as teacher inside YOLOv5's own training loop (real train.main, tiny data)."""

from __future__ import annotations

import contextlib
import copy
import importlib

import pytest
import torch

from yolo_prune_plugin import api
from yolo_prune_plugin.backend.distillation import DistillLoss, DistillStats, distill_term
from yolo_prune_plugin.backend.loading import load_checkpoint
from yolo_prune_plugin.config import config_from_dict
from yolo_prune_plugin.errors import ConfigError, PruneError
from yolo_prune_plugin.prune.unstructured import prune_model
from yolo_prune_plugin.training import masks as M
from yolo_prune_plugin.training.finetune import finetune_checkpoint

from testkit import save_checkpoint, seeded_rand

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def dense(tiny_model):
    return tiny_model


def _opt(backend, data, cfg, project):
    return api.train_opt([], backend, data=str(data), cfg=str(cfg), weights="", imgsz=64, batch_size=2,
                         device="cpu", workers=0, noplots=True, noautoanchor=True, project=str(project), name="base")


def _pruned_file(dense, path):
    m = copy.deepcopy(dense)
    prune_model(m, 0.5, "global")
    return save_checkpoint(m, path)


def test_masked_finetune_distils_from_the_dense_model_in_yolov5s_loop(backend, dense, tiny_data, tiny_cfg, tmp_path):
    w = _pruned_file(dense, tmp_path / "pruned.pt")
    before = {k: v.clone() for k, v in dense.float().state_dict().items()}
    original = backend.train.ComputeLoss
    res = finetune_checkpoint(w, _opt(backend, tiny_data, tiny_cfg, tmp_path), 1, masks="zeros", teacher=dense,
                              distill_weight=2.0, project=tmp_path, name="ft", backend=backend)
    assert backend.train.ComputeLoss is original  # the wrap is undone
    row = res.history[0]
    assert row["loss_teacher"] > 0 and row["loss_total"] == pytest.approx(row["loss_yolo"] + row["loss_teacher"])
    assert res.distill["batches"] == 2 == row["optimizer_steps"]  # every training batch, no validation call
    assert res.distill["weight"] == 2.0 and res.distill["teacher_dtype"] == "torch.float32"  # fp16 only on CUDA
    assert res.distill["teacher_mb"] == pytest.approx(sum(p.numel() for p in dense.parameters()) * 4 / 2 ** 20, abs=0.01)
    after = res.teacher.state_dict()  # the live teacher: weights and BatchNorm statistics untouched
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())  # nor the caller's model
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in res.model.modules())  # nothing on the student
    assert res.leaked == 0 and M.count_masked(res.masks) > 0


def test_distillation_off_trains_bit_for_bit_as_without_it(backend, dense, tiny_data, tiny_cfg, tmp_path):
    """Distillation off never wraps the loss; a teacher at weight 0 (wrapped, teacher run on every batch) gives
    the same weights bit for bit: the wrap adds exactly the teacher term and nothing else."""
    w = _pruned_file(dense, tmp_path / "pruned.pt")
    runs = {}
    for name, teacher in (("off", None), ("w0", dense)):
        res = finetune_checkpoint(w, _opt(backend, tiny_data, tiny_cfg, tmp_path), 1, masks="zeros", teacher=teacher,
                                  distill_weight=0.0, project=tmp_path, name=name, backend=backend)
        runs[name] = load_checkpoint(res.last)["model"].state_dict()
        assert (res.distill is None) == (teacher is None)
    assert all(torch.equal(runs["off"][k], runs["w0"][k]) for k in runs["off"])


def test_distill_term_is_zero_for_the_teacher_itself_and_positive_otherwise(backend, dense):
    from yolo_prune_plugin.backend.distillation import teacher_copy

    ComputeLoss = importlib.import_module(backend.prefix + "utils.loss").ComputeLoss
    bbox_iou = importlib.import_module(backend.prefix + "utils.metrics").bbox_iou
    dense.hyp = {"box": 0.05, "obj": 1.0, "cls": 0.5, "cls_pw": 1.0, "obj_pw": 1.0, "fl_gamma": 0.0, "anchor_t": 4.0,
                 "label_smoothing": 0.0}
    loss = ComputeLoss(dense)
    x = seeded_rand(2, 3, 64, 64)
    teacher = teacher_copy(dense, torch.device("cpu"))
    t = teacher(x)[1]
    same, _ = distill_term(t, t, loss, bbox_iou)
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    other = [v + torch.randn(v.shape, generator=g, dtype=v.dtype) for v in t]
    assert float(distill_term(other, t, loss, bbox_iou)[0]) > 0.01


def test_gpu_out_of_memory_in_the_teacher_names_the_key(backend, dense):
    class Teacher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    wrapped = DistillLoss(lambda p, t: (torch.zeros(()), torch.zeros(3)), Teacher(), DistillStats(1.0, 3.5), None)

    def train(imgs, ema=None):  # the loss's caller, as in YOLOv5's train(): its frame holds the batch
        return wrapped([torch.zeros(1)], torch.zeros(0, 6))

    with pytest.raises(PruneError, match=r"finetune\.distill: false"):
        train(torch.zeros(1, 3, 64, 64))
    assert wrapped([torch.zeros(1)], torch.zeros(0, 6))[0] == 0  # another caller (val.run): YOLOv5's loss alone


@pytest.mark.parametrize("ft,match", [
    ({"distill": "yes"}, "finetune.distill"),
    ({"distill_weight": -1}, r"finetune\.distill_weight.*\[0, 100\]"),
])
def test_bad_distill_options_name_the_key(ft, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"finetune": {"epochs": 1, **ft}})


@pytest.mark.parametrize("argv,prefix", [
    (["prune", "--weights", "w.pt", "--finetune-epochs", "3", "--finetune-distill"], ""),
    (["train", "--prune-finetune-epochs", "3", "--prune-finetune-distill"], "prune-"),
])
def test_distill_flags_reach_the_config(argv, prefix):
    from yolo_prune_plugin.cli import _config_from_args, build_parser

    ns, _ = build_parser().parse_known_args(argv)
    ft = _config_from_args(ns, prefix).finetune
    assert ft.epochs == 3 and ft.distill is True and ft.distill_weight == 1.0


# -- the feature term (finetune.distill_features) ------------------------------------------------------------------

def _channel_pruned(dense, amount=0.4):
    from yolo_prune_plugin.prune.channel import channel_prune

    m = copy.deepcopy(dense).float()
    channel_prune(m, amount, importance="l1", round_to=4, imgsz=64, log=False)
    return m


@pytest.mark.parametrize("bn", ["default", "trained"])
def test_channel_index_finds_the_teacher_channels_a_channel_prune_kept(dense, bn):
    """Default BatchNorm (scale 1, shift 0 everywhere: no pairing) -> by Detect's weight columns; distinct BatchNorm
    values -> by the producing BatchNorm, still exact after Detect's columns were refit (as channel.reconstruct does)."""
    from yolo_prune_plugin.backend.distillation import channel_index

    teacher = copy.deepcopy(dense).float()
    if bn == "trained":
        g = torch.Generator().manual_seed(3)
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
                m.bias.data = torch.randn(m.num_features, generator=g)
    pruned = _channel_pruned(teacher)
    s, t = pruned.model[-1], teacher.model[-1]
    narrower = [i for i, (a, b) in enumerate(zip(s.m, t.m)) if a.weight.shape[1] < b.weight.shape[1]]
    assert narrower  # the prune removed channels from at least one map that feeds Detect
    truth, _, how = channel_index(pruned, teacher)  # columns still exact here
    for a, b, idx in zip(s.m, t.m, truth):
        assert torch.equal(a.weight, b.weight[:, idx])  # every kept column is exactly the teacher's matched column
        assert len(set(idx.tolist())) == len(idx)
    want = "batchnorm" if bn == "trained" else "columns"
    assert [h for i, h in enumerate(how) if i in narrower] == [want] * len(narrower)
    if bn == "trained":
        with torch.no_grad():
            for conv in s.m:  # refit Detect's columns: the BatchNorm pairing does not depend on them
                conv.weight.add_(0.5 * seeded_rand(*conv.weight.shape, seed=4))
        index, match, how = channel_index(pruned, teacher)
        assert all(torch.equal(i, j) for i, j in zip(index, truth)) and min(match) < 0.99
    same, sims, how = channel_index(teacher, teacher)
    assert all(torch.equal(i, torch.arange(c.weight.shape[1])) for i, c in zip(same, t.m))
    assert sims == pytest.approx([1.0] * len(t.m)) and how == ["identity"] * len(t.m)


def test_feature_term_is_zero_for_matched_maps_scale_free_and_positive_otherwise():
    from yolo_prune_plugin.backend.distillation import feature_term

    t = [seeded_rand(2, 8, 4, 4, seed=s) for s in range(3)]
    idx = [torch.tensor([0, 2, 5]), torch.arange(8), torch.tensor([7, 1])]
    s = [v[:, i] for v, i in zip(t, idx)]
    assert float(feature_term(s, t, idx)) == pytest.approx(0.0, abs=1e-6)
    assert float(feature_term([3.0 * v for v in s], t, idx)) == pytest.approx(0.0, abs=1e-6)  # per-image scale
    other = [v + seeded_rand(*v.shape, seed=9) for v in s]
    assert 0.01 < float(feature_term(other, t, idx)) <= 4.0


def test_feature_term_trains_a_channel_pruned_model_against_the_dense_neck(backend, dense, tiny_data, tiny_cfg,
                                                                            tmp_path, monkeypatch):
    """Real train.main on a channel-pruned file (its own architecture): the feature term is on every training batch,
    at distill_features x YOLOv5's loss on the first one; Detect.forward is YOLOv5's own again afterwards."""
    import yolo_prune_plugin.training.finetune as FT

    seen, real = {}, FT.distilled_loss

    @contextlib.contextmanager
    def spy(*a, **k):
        with real(*a, **k) as stats:
            seen["stats"] = stats
            yield stats

    monkeypatch.setattr(FT, "distilled_loss", spy)
    det_cls = type(dense.model[-1])
    forward = det_cls.__dict__.get("forward")
    w = save_checkpoint(_channel_pruned(dense), tmp_path / "channel.pt")
    res = finetune_checkpoint(w, _opt(backend, tiny_data, tiny_cfg, tmp_path), 1, masks=None, teacher=dense,
                              distill_weight=0.0, distill_features=0.25, keep_architecture=True, project=tmp_path,
                              name="ft", backend=backend)
    assert det_cls.__dict__.get("forward") is forward  # the class-level wrap is undone
    d = res.distill
    assert d["features"] == 0.25 and d["feature_scale"] > 0 and d["feature_match"] == pytest.approx([1.0] * 3, abs=1e-5)
    assert set(d["feature_matched_by"]) <= {"identity", "columns", "batchnorm"} and len(d["feature_matched_by"]) == 3
    first = seen["stats"].first
    assert first["loss_feature"] == pytest.approx(0.25 * first["loss_yolo"], rel=1e-4)
    row = res.history[0]
    assert row["loss_feature"] > 0 and row["loss_total"] == pytest.approx(row["loss_yolo"] + row["loss_teacher"]
                                                                          + row["loss_feature"], rel=1e-5)
    assert row["loss_teacher"] == 0 and d["batches"] == 2  # distill_weight 0: the feature term alone, every batch
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in res.model.modules())
    assert "forward" not in vars(res.model.model[-1])  # nothing set on the module (it is saved in every checkpoint)
    assert type(load_checkpoint(res.last)["model"].model[-1]).forward is forward


@pytest.mark.parametrize("ft,match", [
    ({"distill_features": 0.5}, r"'finetune.distill_features' \(0.5\).*needs 'finetune.distill: true'"),
    ({"distill": True, "distill_features": 101}, r"'finetune.distill_features' must be in \[0, 100\]"),
])
def test_bad_feature_term_options_name_the_key(ft, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"finetune": {"epochs": 1, **ft}})


@pytest.mark.parametrize("argv,prefix", [
    (["prune", "--weights", "w.pt", "--finetune-epochs", "3", "--finetune-distill", "--finetune-distill-features",
      "0.5", "--finetune-keep", "best", "--finetune-lr-schedule", "cosine"], ""),
    (["train", "--prune-finetune-epochs", "3", "--prune-finetune-distill", "--prune-finetune-distill-features", "0.5",
      "--prune-finetune-keep", "best", "--prune-finetune-lr-schedule", "cosine"], "prune-"),
])
def test_feature_keep_and_schedule_flags_reach_the_config(argv, prefix):
    from yolo_prune_plugin.cli import _config_from_args, build_parser

    ns, _ = build_parser().parse_known_args(argv)
    ft = _config_from_args(ns, prefix).finetune
    assert (ft.distill, ft.distill_features, ft.keep, ft.lr_schedule) == (True, 0.5, "best", "cosine")


@pytest.mark.parametrize("flag,value,match", [
    ("finetune-keep", "newest", r"^--finetune-keep: 'finetune.keep' must be one of auto, last, best"),
    ("finetune-lr-schedule", "step", r"^--finetune-lr-schedule: 'finetune.lr_schedule' must be one of run"),
    ("finetune-distill-features", "-1", r"^--finetune-distill-features: .*must be in \[0, 100\]"),
])
def test_bad_finetune_flags_name_the_flag(flag, value, match):
    from yolo_prune_plugin.cli import _config_from_args, build_parser

    ns, _ = build_parser().parse_known_args(["prune", "--weights", "w.pt", f"--{flag}", value])
    with pytest.raises(ConfigError, match=match):
        _config_from_args(ns, "")
