"""finetune.distill: the dense model as teacher inside YOLOv5's own training loop (real train.main, tiny data)."""

from __future__ import annotations

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
