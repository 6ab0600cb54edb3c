"""Distillation from the dense model inside YOLOv5's own training loop (``finetune.distill``): an output term and,
with ``finetune.distill_features``, a feature term on the neck outputs that feed ``Detect``.

``train()`` builds ``compute_loss = ComputeLoss(model)`` just before ``on_train_start`` and calls it once per
training batch (``compute_loss(pred, targets)``) and from ``val.run`` (validation losses). Inside
:func:`distilled_loss`, ``train.ComputeLoss`` builds YOLOv5's own loss wrapped in :class:`DistillLoss` (the
name is restored on exit): called from ``train()``, it reads the batch's ``imgs`` from ``train()``'s frame (nothing
is hooked on the student), the teacher (a frozen copy of the dense model in eval mode, fp16 on CUDA) runs on them
without gradients, and the returned
loss is YOLOv5's plus ``weight x batch_size x`` the term of :func:`distill_term`. Validation calls (no
training forward since the last call) get YOLOv5's loss alone; the three logged loss items stay YOLOv5's.

The feature term (:func:`feature_term`) needs the inputs of the student's and the teacher's ``Detect``: while the
loss exists, ``forward`` of their ``Detect`` class is wrapped at class level (nothing is set on a module, so nothing
travels into a checkpoint) and records the input list of those two modules only. A channel-pruned student has
fewer channels in these maps than the teacher: each student channel is matched to a teacher channel
(:func:`channel_index`: by the BatchNorm that produces the map, else by the ``Detect`` weight columns). Its strength
is relative: ``distill_features`` x YOLOv5's loss on the first training batch (the term is rescaled once, then fixed).
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
    first: dict = field(default_factory=dict)  # the first training batch's values
    features: float = 0.0  # weight of the feature term, relative to YOLOv5's loss on the first batch (0: off)
    feature_scale: Optional[float] = None  # the fixed factor that made the first batch's term that share
    feature_match: list = field(default_factory=list)  # per Detect input: mean cosine of the matched channel weights
    feature_matched_by: list = field(default_factory=list)  # per Detect input: identity | batchnorm | columns

    def epoch_reset(self) -> None:
        self.epoch = {}

    def add(self, values: dict) -> None:
        self.batches += 1
        self.last = values
        self.first = self.first or values
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
    return term, {"obj": float(l_obj.detach()), "cls": float(l_cls.detach()), "box": float(l_box.detach()),
                  "confident": box_n}


def _producer_bn(model: nn.Module, layer: int) -> Optional[nn.BatchNorm2d]:
    """The BatchNorm that ends YOLOv5 layer ``layer`` (``C3``: its ``cv3``; ``Conv``: itself), if any."""
    mod = model.model[layer]
    bn = getattr(getattr(mod, "cv3", mod), "bn", None)
    return bn if isinstance(bn, nn.BatchNorm2d) else None


def channel_index(student: nn.Module, teacher: nn.Module) -> tuple[list[torch.Tensor], list[float], list[str]]:
    """For each input map of ``Detect`` (``student`` and ``teacher`` are YOLOv5 detection models): the teacher channel
    matched to each student channel, the mean cosine similarity of the matched ``Detect`` weight columns, and how the
    match was made. Equal widths: ``identity``. Otherwise ``batchnorm``: the teacher channel with the same scale and
    shift in the BatchNorm that produces the map (a channel prune slices it, and neither reconstruction nor
    BatchNorm recalibration changes it: exact for a freshly pruned model), when that pairs every student channel
    with a different teacher channel; else ``columns``: the most similar ``Detect`` weight column (the 1x1 convs
    that read the map never lose output channels; ``channel.reconstruct`` refits them, so this is approximate)."""
    sd, td = _detect(student), _detect(teacher)
    index, match, how = [], [], []
    for i, (s, t) in enumerate(zip(sd.m, td.m)):
        ws, wt = s.weight.detach().float().flatten(1), t.weight.detach().float().flatten(1)
        if ws.shape[1] == wt.shape[1]:
            idx, by = torch.arange(ws.shape[1]), "identity"
        else:
            idx, by = None, "columns"
            bs, bt = _producer_bn(student, sd.f[i]), _producer_bn(teacher, td.f[i])
            if bs is not None and bt is not None and (bs.num_features, bt.num_features) == (ws.shape[1], wt.shape[1]):
                a = torch.stack((bs.weight, bs.bias), 1).detach().float().cpu()
                b = torch.stack((bt.weight, bt.bias), 1).detach().float().cpu()
                near = torch.cdist(a, b).argmin(1)
                if len(set(near.tolist())) == len(near):
                    idx, by = near, "batchnorm"
            if idx is None:
                sim = F.normalize(ws.T, dim=1) @ F.normalize(wt.T, dim=1).T  # (student channels, teacher channels)
                idx = sim.argmax(1).cpu()
        index.append(idx)
        match.append(round(float(F.cosine_similarity(ws, wt[:, idx.to(wt.device)], dim=0).mean()), 6))
        how.append(by)
    return index, match, how


def feature_term(student: list[torch.Tensor], teacher: list[torch.Tensor], index: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the ``Detect`` inputs of the squared distance between the student's map and the teacher's matched
    channels, each image's map scaled to unit norm (so the term is in [0, 4] whatever the features' scale)."""
    total = torch.zeros((), device=student[0].device)
    for s, t, idx in zip(student, teacher, index):
        s = s.float().flatten(1)
        t = t.float()[:, idx.to(t.device)].flatten(1)
        total = total + (F.normalize(s, dim=1) - F.normalize(t, dim=1)).pow(2).sum(1).mean()
    return total / max(len(student), 1)


class DistillLoss:
    """YOLOv5's ``ComputeLoss`` plus the teacher term on training batches (see the module docstring)."""

    def __init__(self, loss: Any, teacher: nn.Module, stats: DistillStats, bbox_iou: Any,
                 detect_inputs: Optional["_DetectInputs"] = None):
        self.loss, self.teacher, self.stats, self._bbox_iou = loss, teacher, stats, bbox_iou
        self.detect_inputs = detect_inputs  # None: no feature term

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
        values = {"loss_yolo": float(loss.detach()), "loss_teacher": float(added.detach()),
                  **{f"kd_{k}": v for k, v in parts.items()}}
        if self.detect_inputs is not None:
            feats = self.detect_inputs.take()
            if feats is not None:
                f = feature_term(*feats, self.detect_inputs.index)
                if self.stats.feature_scale is None:  # once: the first batch's term = features x YOLOv5's loss
                    self.stats.feature_scale = float(loss.detach()) / images.shape[0] / max(float(f.detach()), 1e-9)
                feat_added = self.stats.features * self.stats.feature_scale * f * images.shape[0]
                added = added + feat_added
                values.update(loss_feature=float(feat_added.detach()), kd_feature=float(f.detach()))
        total = loss + added
        values["loss_total"] = float(total.detach())
        self.stats.add(values)
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


class _DetectInputs:
    """The input maps of two ``Detect`` modules (student, teacher) as their last forward saw them (see the module
    docstring: recorded by a class-level wrap of ``forward``, undone with the loss's context)."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        """``student``, ``teacher``: the two detection models (their ``Detect`` modules are watched)."""
        self.student, self.teacher = id(_detect(student)), id(_detect(teacher))
        self.index, self.match, self.how = channel_index(student, teacher)
        self.seen: dict[int, list] = {}

    def wrap(self, forward: Any) -> Any:
        def recording_forward(module: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
            if id(module) in (self.student, self.teacher):
                self.seen[id(module)] = list(x)  # Detect.forward replaces the list's items in place
            return forward(module, x, *args, **kwargs)
        return recording_forward

    def take(self) -> Optional[tuple[list, list]]:
        s, t = self.seen.pop(self.student, None), self.seen.pop(self.teacher, None)
        return None if s is None or t is None else (s, t)


def _detect(model: nn.Module) -> nn.Module:
    """The ``Detect`` module of a YOLOv5 detection model (unwrapped: no DDP / DataParallel)."""
    return model.model[-1]


@contextlib.contextmanager
def distilled_loss(backend: Backend, teacher: nn.Module, weight: float,
                   features: float = 0.0) -> Iterator[DistillStats]:
    """Inside: the ``ComputeLoss`` that YOLOv5's ``train()`` builds adds the teacher term (see the module
    docstring); ``teacher`` is copied (frozen, eval, moved to the student's device when the loss is built).
    ``features`` > 0 adds the feature term on ``Detect``'s inputs at that strength. The name (and ``Detect.forward``)
    is restored on exit, also on exceptions. Yields the running statistics."""
    original = backend.train.ComputeLoss
    bbox_iou = importlib.import_module(backend.prefix + "utils.metrics").bbox_iou
    nbytes = sum(q.numel() * (2 if torch.cuda.is_available() else 4) for q in teacher.parameters())
    stats = DistillStats(weight=float(weight), teacher_mb=nbytes / 2 ** 20, features=float(features))

    with contextlib.ExitStack() as wraps:
        def factory(model: nn.Module, autobalance: bool = False) -> DistillLoss:
            device = next(model.parameters()).device
            stats.teacher = teacher_copy(teacher, device)
            stats.teacher_mb = sum(q.numel() * q.element_size() for q in stats.teacher.parameters()) / 2 ** 20
            inputs = None
            if stats.features > 0:  # the wrap lives as long as the context (train() builds the loss once)
                student = getattr(model, "module", model)  # DDP / DataParallel
                inputs = _DetectInputs(student, stats.teacher)
                stats.feature_match, stats.feature_matched_by = inputs.match, inputs.how
                for cls in dict.fromkeys((type(_detect(student)), type(_detect(stats.teacher)))):
                    wraps.enter_context(replaced(cls, "forward", inputs.wrap(cls.forward)))
            return DistillLoss(original(model, autobalance), stats.teacher, stats, bbox_iou, inputs)

        with replaced(backend.train, "ComputeLoss", factory):
            yield stats
