"""Output-level distillation from the dense model inside YOLOv5's own training loop (``finetune.distill``).

``train()`` builds ``compute_loss = ComputeLoss(model)`` just before ``on_train_start`` and calls it once per
training batch (``compute_loss(pred, targets)``) and from ``val.run`` (validation losses). Inside
:func:`distilled_loss`, ``train.ComputeLoss`` builds YOLOv5's own loss wrapped in :class:`DistillLoss` (the
name is restored on exit): called from ``train()``, it reads the batch's ``imgs`` from ``train()``'s frame (nothing
is hooked on the student), the teacher (a frozen copy of the dense model in eval mode, fp16 on CUDA) runs on them
without gradients, and the returned
loss is YOLOv5's plus ``weight x batch_size x`` the term of :func:`distill_term`. Validation calls (no
training forward since the last call) get YOLOv5's loss alone; the three logged loss items stay YOLOv5's.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PruneError
from .loading import Backend
from .patches import replaced

#: teacher predictions above this objectness are "confident": their boxes are regression targets
CONFIDENT = 0.5

OOM_MESSAGE = ("GPU out of memory while fine-tuning with the distillation teacher ({mb:.1f} MB of weights plus its "
               "activations for each batch); set finetune.distill: false (or a smaller --batch-size)")


@dataclass
class DistillStats:
    """What the wrapped loss did: running sums since the last :meth:`epoch_reset`, and the totals."""

    weight: float
    teacher_mb: float  # the teacher's weights (fp16 on CUDA, fp32 on CPU)
    teacher: Optional[nn.Module] = field(default=None, repr=False)
    batches: int = 0
    epoch: dict = field(default_factory=dict)  # sums over this epoch's batches (loss_yolo, loss_teacher, kd_obj, ...)
    last: dict = field(default_factory=dict)  # the last training batch's values (tests)

    def epoch_reset(self) -> None:
        self.epoch = {}

    def add(self, values: dict) -> None:
        self.batches += 1
        self.last = values
        for k, v in values.items():
            self.epoch[k] = self.epoch.get(k, 0.0) + v
        self.epoch["batches"] = self.epoch.get("batches", 0) + 1

    def epoch_means(self) -> dict:
        n = self.epoch.get("batches", 0)
        return {k: round(v / n, 6) for k, v in self.epoch.items() if k != "batches"} if n else {}


def _bernoulli_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of independent sigmoid outputs, from logits (elementwise, 0 when they agree)."""
    p = teacher.sigmoid()
    return (F.binary_cross_entropy_with_logits(student, p, reduction="none")
            - F.binary_cross_entropy_with_logits(teacher, p, reduction="none"))


def distill_term(student: list[torch.Tensor], teacher: list[torch.Tensor], loss: Any,
                 bbox_iou: Any) -> tuple[torch.Tensor, dict]:
    """The teacher term per image for YOLOv5 ``Detect`` training outputs (``bs, na, ny, nx, 5 + nc`` per layer).

    Objectness: KL to the teacher's objectness at every cell (YOLOv5's per-layer ``balance``); classes: KL to the
    teacher's class probabilities weighted by its objectness; boxes: ``1 - CIoU`` against the boxes of the teacher's
    confident predictions (objectness > :data:`CONFIDENT`), decoded as ``ComputeLoss`` decodes them. Each part is
    scaled by YOLOv5's own gains (``hyp['obj'|'cls'|'box']`` after ``train()`` scaled them).
    """
    h = loss.hyp
    dev = student[0].device
    l_obj = torch.zeros((), device=dev)
    cls_num, cls_den = torch.zeros((), device=dev), torch.zeros((), device=dev)
    box_sum, box_n = torch.zeros((), device=dev), 0
    for i, (s, t) in enumerate(zip(student, teacher)):
        s, t = s.float(), t.float()
        l_obj = l_obj + _bernoulli_kl(s[..., 4], t[..., 4]).mean() * loss.balance[i]
        conf = t[..., 4].sigmoid()
        if s.shape[-1] > 5:
            cls_num = cls_num + (conf * _bernoulli_kl(s[..., 5:], t[..., 5:]).mean(-1)).sum()
            cls_den = cls_den + conf.sum()
        sel = conf > CONFIDENT
        if sel.any():
            anchors = loss.anchors[i].to(dev).view(1, -1, 1, 1, 2)

            def boxes(x: torch.Tensor) -> torch.Tensor:
                xy = x[..., :2].sigmoid() * 2 - 0.5
                wh = (x[..., 2:4].sigmoid() * 2) ** 2 * anchors
                return torch.cat((xy, wh), -1)[sel]

            iou = bbox_iou(boxes(s), boxes(t), CIoU=True).squeeze(-1)
            box_sum, box_n = box_sum + (1.0 - iou).sum(), box_n + int(sel.sum())
    l_cls = cls_num / cls_den.clamp(min=1e-9)
    l_box = box_sum / max(box_n, 1)
    term = h["obj"] * l_obj + h["cls"] * l_cls + h["box"] * l_box
    return term, {"obj": float(l_obj), "cls": float(l_cls), "box": float(l_box), "confident": box_n}


class DistillLoss:
    """YOLOv5's ``ComputeLoss`` plus the teacher term on training batches (see the module docstring)."""

    def __init__(self, loss: Any, teacher: nn.Module, stats: DistillStats, bbox_iou: Any):
        self.loss, self.teacher, self.stats, self._bbox_iou = loss, teacher, stats, bbox_iou

    def __getattr__(self, name: str) -> Any:  # YOLOv5's attributes (hyp, balance, gr, ...)
        if name == "loss":
            raise AttributeError(name)
        return getattr(self.loss, name)

    def __call__(self, p: Any, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, items = self.loss(p, targets)
        images = _training_images(sys._getframe(1))
        if images is None or not isinstance(p, (list, tuple)):  # validation: YOLOv5's loss alone
            return loss, items
        dtype = next(self.teacher.parameters()).dtype
        try:
            with torch.no_grad():
                t = self.teacher(images.detach().to(dtype))
        except torch.cuda.OutOfMemoryError:
            raise PruneError(OOM_MESSAGE.format(mb=self.stats.teacher_mb)) from None
        t = t[1] if isinstance(t, tuple) else t  # eval-mode Detect: (inference, raw outputs)
        term, parts = distill_term(list(p), list(t), self.loss, self._bbox_iou)
        added = self.stats.weight * term * images.shape[0]
        total = loss + added
        self.stats.add({"loss_yolo": float(loss), "loss_teacher": float(added), "loss_total": float(total),
                        **{f"kd_{k}": v for k, v in parts.items()}})
        return total, items


def _training_images(caller: Any) -> Optional[torch.Tensor]:
    """The batch ``train()`` just ran the student on, when ``train()`` itself is the loss's caller (read from its
    frame, nothing is hooked on the model: a hook would travel into every checkpoint); None from ``val.run``."""
    try:
        if caller.f_code.co_name == "train" and "ema" in caller.f_locals:
            images = caller.f_locals.get("imgs")
            return images if torch.is_tensor(images) else None
        return None
    finally:
        del caller


def teacher_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A frozen eval-mode copy of ``model`` on ``device`` (fp16 on CUDA, fp32 on CPU)."""
    t = copy.deepcopy(model).float().eval().to(device)
    if device.type == "cuda":
        t = t.half()
    for q in t.parameters():
        q.requires_grad_(False)
    return t


@contextlib.contextmanager
def distilled_loss(backend: Backend, teacher: nn.Module, weight: float) -> Iterator[DistillStats]:
    """Inside: the ``ComputeLoss`` that YOLOv5's ``train()`` builds adds the teacher term (see the module
    docstring); ``teacher`` is copied (frozen, eval, moved to the student's device when the loss is built). The
    name is restored on exit, also on exceptions. Yields the running statistics."""
    original = backend.train.ComputeLoss
    bbox_iou = importlib.import_module(backend.prefix + "utils.metrics").bbox_iou
    nbytes = sum(q.numel() * (2 if torch.cuda.is_available() else 4) for q in teacher.parameters())
    stats = DistillStats(weight=float(weight), teacher_mb=nbytes / 2 ** 20)

    def factory(model: nn.Module, autobalance: bool = False) -> DistillLoss:
        device = next(model.parameters()).device
        stats.teacher = teacher_copy(teacher, device)
        stats.teacher_mb = sum(q.numel() * q.element_size() for q in stats.teacher.parameters()) / 2 ** 20
        return DistillLoss(original(model, autobalance), stats.teacher, stats, bbox_iou)

    with replaced(backend.train, "ComputeLoss", factory):
        yield stats
