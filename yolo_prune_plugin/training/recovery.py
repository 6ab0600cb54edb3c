"""Prune-aware fine-tuning of a finished checkpoint (``finetune.recipe: regularize``).

Plain recovery prunes one-shot and fine-tunes the smaller model for ``finetune.epochs``. The ``regularize``
recipe spends ``finetune.regularize_share`` of those epochs first on the **dense** model, in YOLOv5's own loop,
with the targeted L1 penalty of :mod:`~yolo_prune_plugin.training.channel_regularize` on the BatchNorm scales and
shifts of exactly the channels the one-shot prune chose (the *plan*), and those scales and shifts (of the model and
of its EMA) fade linearly to exactly zero by the phase's last batch: the rest of the network learns to do without
them while they fade. Then exactly that plan is removed (lossless: the channels output 0; the residual norm and
the removal's output change are reported) and the smaller model is fine-tuned for the
remaining epochs (:func:`yolo_prune_plugin.stages.finetune_stage`). The phase itself is
:func:`yolo_prune_plugin.stages.regularize_stage` (it runs the pipeline's stages); the pieces are here.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Optional

import torch
import torch.nn as nn

from ..config import PruneConfig

LOGGER = logging.getLogger("yolo_prune_plugin")


def phase_epochs(config: PruneConfig) -> tuple[int, int]:
    """``(penalty epochs, fine-tune epochs)`` of ``finetune.epochs``: the penalty phase is
    ``regularize_share`` of them, rounded half up (1 epoch at share 0.5: the penalty phase, then the removal)."""
    ft = config.finetune
    n = int(ft.epochs)
    if ft.recipe != "regularize" or config.structure != "channel" or n <= 0:
        return 0, n
    k = min(n, int(math.floor(ft.regularize_share * n + 0.5)))
    return k, n - k


def bn_residual(model: nn.Module, targets: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The targeted channels' BatchNorm scale and shift: ``sum |gamma| + |beta|``, their largest ``|gamma|`` and
    the number of channels still above 1e-3 in either."""
    mods = dict(model.named_modules())
    total, largest, alive, n = 0.0, 0.0, 0, 0
    for name, idx in targets.items():
        bn = mods[name]
        g, b = bn.weight.detach().float()[idx].abs(), bn.bias.detach().float()[idx].abs()
        total += float(g.sum() + b.sum())
        largest = max(largest, float(g.max()) if len(g) else 0.0)
        alive += int(((g > 1e-3) | (b > 1e-3)).sum())
        n += len(idx)
    return {"l1": round(total, 6), "max_scale": round(largest, 6), "channels": n, "alive": alive}


@torch.no_grad()
def output_change(before: nn.Module, after: nn.Module, images: torch.Tensor) -> float:
    """Relative L2 change of the raw detection outputs (eval mode) from ``before`` to ``after`` on ``images``."""
    def out(m: nn.Module) -> torch.Tensor:
        y = m.eval()(images)
        y = y[0] if isinstance(y, (tuple, list)) else y
        return y.float().flatten()

    a, b = out(before), out(after)
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


def recipe_section(config: PruneConfig, penalty: Optional[dict], finetune: Optional[dict]) -> dict:
    """The report's ``finetune`` entry for a recipe: the phase split and each phase's record."""
    k, rest = phase_epochs(config)
    ft = config.finetune
    base = dict(finetune or {})
    last = {key: (finetune or {}).get(key) for key in ("run", "source", "seconds", "imgsz", "lr0")}
    base.update(epochs=ft.epochs, recipe=ft.recipe,
                phases={"regularize": penalty, "finetune": {"epochs": rest, **last} if rest else None},
                split={"regularize_epochs": k, "finetune_epochs": rest, "share": ft.regularize_share})
    if not finetune and penalty:  # all epochs in the penalty phase: its run is the file's source
        base.update(run=penalty["run"], source=penalty["source"], seconds=penalty["seconds"], imgsz=penalty["imgsz"],
                    history=penalty["history"], lr_scale=ft.lr_scale, lr0=penalty["lr0"])
    return base


__all__ = ["phase_epochs", "bn_residual", "output_change", "recipe_section"]
