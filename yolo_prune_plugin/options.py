"""The option sections of :class:`~yolo_prune_plugin.config.PruneConfig` (``export_options:``, ``calibration:``,
``sweep:``, ``finetune:``, ``schedule:``, ``bn_recalibration:``, ``target:``): frozen dataclasses with their defaults.
Validated by :mod:`yolo_prune_plugin.config`; the pruning methods' own options live in
:mod:`yolo_prune_plugin.prune.registry` (``obs:``, ``channel:``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

@dataclass(frozen=True)
class ExportOptions:
    """YOLOv5 ``export.run`` options passed through for every exported format."""

    half: bool = False
    dynamic: bool = False
    simplify: bool = False
    opset: Optional[int] = None
    atol: float = 1e-3  # largest allowed output difference between an artefact and the pruned .pt


@dataclass(frozen=True)
class CalibrationOptions:
    """Calibration images for data-aware methods (taken from the training split, never the val split)."""

    images: int = 32  # held-out retention at 50 %: 0.896 with 32, 0.867 with 16 (README)
    batch_size: int = 8
    seed: int = 0
    allow_overlap: bool = False  # accept train images that are also val images (metrics then optimistic)


@dataclass(frozen=True)
class SweepOptions:
    """An optional sweep of (method, amount) points evaluated at train end."""

    amounts: tuple[float, ...] = ()
    methods: tuple[str, ...] = ("global",)


@dataclass(frozen=True)
class FinetuneOptions:
    """Masked fine-tuning after pruning (0 epochs = off)."""

    epochs: int = 0
    lr_scale: float = 0.1
    imgsz: Optional[int] = None
    warmup: bool = False  # YOLOv5's >=100-iteration lr warmup from 0 (most of a short fine-tune)
    distill: bool = False  # add an output-level term from the dense (unpruned) model to YOLOv5's loss
    distill_weight: float = 1.0  # the teacher term's weight (its parts carry YOLOv5's own box/obj/cls gains)
    # with distill: a feature term on the neck outputs that feed Detect (the pruned model's channels matched to the
    # teacher's), this share of YOLOv5's loss on the first training batch (0: off)
    distill_features: float = 0.0
    # plain: prune, then fine-tune all epochs; regularize (structure: channel): the dense model first trains the
    # planned channels toward zero for regularize_share of the epochs, exactly that plan is removed, then the
    # smaller model is fine-tuned for the rest (training/recovery.py)
    recipe: str = "plain"
    regularize_share: float = 0.5  # share of the epochs in the penalty phase (recipe: regularize)
    regularize_weight: float = 0.5  # lambda of the penalty phase (as channel.regularize.weight)
    # run: the checkpoint's own (its saved opt.cos_lr, else YOLOv5's linear decay to lr0 x lrf); linear; cosine
    lr_schedule: str = "run"
    # auto: the better of best.pt and last.pt by the plugin's own validation on the data's val split when it has at
    # least AUTO_KEEP_MIN_IMAGES images, else last.pt; last: the last epoch (EMA); best: YOLOv5's best.pt
    keep: str = "auto"


#: ``finetune.recipe`` values
FINETUNE_RECIPES = ("plain", "regularize")
#: ``finetune.lr_schedule`` values and ``finetune.keep`` values
FINETUNE_LR_SCHEDULES = ("run", "linear", "cosine")
FINETUNE_KEEP = ("auto", "last", "best")
#: ``finetune.keep: auto`` compares best.pt and last.pt only on a val split of at least this many images (fewer: last)
AUTO_KEEP_MIN_IMAGES = 100


@dataclass(frozen=True)
class ScheduleOptions:
    """Gradual pruning during training (cubic schedule of Zhu & Gupta 2017). ``final_amount`` None = off."""

    start_epoch: int = 0
    end_epoch: int = 0
    final_amount: Optional[float] = None
    every: int = 1


@dataclass(frozen=True)
class BNRecalibrationOptions:
    """BatchNorm statistics re-estimated after pruning on train-split images (no gradient step).

    ``images: null`` = the structure's default, chosen by measurement: 32 for ``channel`` (it always helped),
    0 = off for ``unstructured`` (it lowered held-out mAP after global L1 and after obs).
    """

    images: Optional[int] = None
    batch_size: int = 8

    def count(self, structure: str) -> int:
        if self.images is not None:
            return self.images
        return 32 if structure == "channel" else 0


#: ``target.runtime`` values (where ``min_speedup`` is measured) and ``target.size_of`` values
TARGET_RUNTIMES = ("onnxruntime", "torch")
TARGET_SIZES = ("params", "onnx")


@dataclass(frozen=True)
class TargetOptions:
    """Prune to a budget (:mod:`yolo_prune_plugin.tools.budget` picks ``amount``); off while no limit is set."""

    max_drop: Optional[float] = None  # largest mAP50-95 drop from the dense model (absolute; relative: fraction)
    relative: bool = False
    min_speedup: Optional[float] = None  # smallest dense/pruned latency ratio on `runtime` (structure: channel)
    runtime: str = "onnxruntime"  # onnxruntime (CPU) | torch (the run's device)
    threads: int = 1  # CPU threads of the latency measurement
    max_size: Optional[float] = None  # largest pruned/dense ratio of params (or .onnx bytes, size_of: onnx)
    size_of: str = "params"
    max_evals: int = 6  # one-shot prunes evaluated at most (6: about 1.5x a 4-point sweep)
    tolerance: float = 0.02  # stop when the boundary is known within this amount
    max_amount: float = 0.9  # the search range is [0, max_amount]
    search_images: Optional[int] = None  # a seeded subset of val for the search (None: all)
    seed: int = 0
    write_best_effort: bool = False  # an impossible budget writes the closest point instead of nothing
    after_finetune: Optional[int] = None  # fine-tune the chosen point N epochs; max_drop is checked after it
    imgsz: Optional[Union[str, tuple]] = None  # also search the input size: "auto" | (sizes,) (None: eval size only)

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.max_drop, self.min_speedup, self.max_size))
