"""Torch-Pruning's view of a YOLOv5 model: dependency groups of coupled channels, their importance and MACs,
channel counts and GFLOPs (used by :mod:`yolo_prune_plugin.prune.channel` and by the tools that measure a model)."""

from __future__ import annotations

import copy
import importlib
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from .registry import CHANNEL_IMPORTANCES as IMPORTANCES
from .unstructured import conv_layers


def _tp() -> Any:
    try:
        return importlib.import_module("torch_pruning")
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ConfigError("structure: channel needs Torch-Pruning: pip install torch-pruning==1.6.1 "
                          "(or yolo_prune_plugin[structured])") from e


# --------------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------------
def gflops(model: nn.Module, imgsz: int = 640) -> Optional[float]:
    """GFLOPs at ``imgsz`` computed exactly as YOLOv5's ``model_info`` does (thop at stride size, scaled)."""
    try:
        import thop
    except ImportError:  # pragma: no cover
        return None
    p = next(model.parameters())
    stride = max(int(model.stride.max()), 32) if hasattr(model, "stride") else 32
    im = torch.empty((1, p.shape[1] if p.dim() > 1 else 3, stride, stride), device=p.device, dtype=p.dtype)
    m = copy.deepcopy(model)
    for mod in m.modules():  # a (re)loaded model may have no FLOP-counter buffers; thop adds its own
        for k in ("total_ops", "total_params"):
            mod._buffers.pop(k, None)
    with torch.no_grad():
        flops = thop.profile(m, inputs=(im,), verbose=False)[0] / 1e9 * 2
    return round(flops * imgsz / stride * imgsz / stride, 3)


def channel_counts(model: nn.Module) -> dict[str, list[int]]:
    """``{conv name: [out_channels, in_channels]}`` for every Conv2d of ``model``."""
    return {n: [m.out_channels, m.in_channels] for n, m in conv_layers(model)}


def _weights(model: nn.Module, names: Sequence[str]) -> int:
    mods = dict(model.named_modules())
    return sum(mods[n].weight.numel() for n in names)


def plan_weights(model: nn.Module, groups: list, dg: Any, plan: Mapping[str, Sequence[int]],
                 names: Sequence[str]) -> Optional[int]:
    """The Conv2d weights of ``names`` that removing ``plan`` (root conv name -> channel indices) would leave,
    counted from the dependency ``groups`` of :func:`_build_groups` without pruning a copy (the amount bisection
    asks this ~10 times per prune). None where the count cannot be read off the groups (a grouped conv, an item
    whose indices do not follow its root's): the caller prunes a copy then.

    Modules are matched by name, so the groups may come from another copy of the same architecture (a budget
    search traces the graph once and prunes a fresh copy of the checkpoint's model at every probe)."""
    by_name = dict(groups)
    name_of = {id(m): n for n, m in dg.model.named_modules()}
    gone: dict[tuple[str, bool], set] = {}
    for root, idxs in plan.items():
        g = by_name.get(root)
        if g is None:
            return None
        items = list(g)
        n = len(items[0].idxs)
        for item in items:
            mod = item.dep.target.module
            if not isinstance(mod, nn.Conv2d):
                continue
            if mod.groups != 1 or len(item.idxs) % n:
                return None
            # a consumer can take each root channel several times (SPPF's cv2 reads cv1 four times over a concat):
            # its indices come in blocks of n; only how many distinct ones go matters here
            out = bool(dg.is_out_channel_pruning_fn(item.dep.handler))
            gone.setdefault((name_of[id(mod)], out), set()).update(
                int(item.idxs[j + b * n]) for b in range(len(item.idxs) // n) for j in idxs)
    mods = dict(model.named_modules())
    total = 0
    for name in names:
        m = mods[name]
        if m.groups != 1:
            return None
        out = m.out_channels - len(gone.get((name, True), ()))
        inp = m.in_channels - len(gone.get((name, False), ()))
        total += out * inp * m.kernel_size[0] * m.kernel_size[1]
    return total


# --------------------------------------------------------------------------------------------------
# channel pruning
# --------------------------------------------------------------------------------------------------
def _importance(name: str) -> Any:
    tp = _tp()
    I = tp.importance  # noqa: E741
    if name == "l1":
        return I.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return I.GroupMagnitudeImportance(p=2)
    if name == "bn":
        return I.BNScaleImportance()
    if name == "lamp":
        return I.LAMPImportance(p=2)
    if name == "taylor":
        return I.GroupTaylorImportance()
    if name in IMPORTANCES:  # 'obs': scored by channel_sensitivity.obs_scores, not by a Torch-Pruning criterion
        raise ConfigError(f"importance {name!r} has no Torch-Pruning criterion (it is scored with calibration "
                          "images by channel_sensitivity.obs_scores)")
    raise ConfigError(f"importance {name!r} is unknown; expected one of {', '.join(IMPORTANCES)}")


def detect_output_convs(model: nn.Module) -> list[nn.Module]:
    """Detect's output convolutions (their channel count is anchors x (5 + classes): never pruned)."""
    det = model.model[-1]
    return list(det.m) if hasattr(det, "m") else []


def _build_groups(model: nn.Module, ignored: list[nn.Module], imgsz: int) -> tuple[Any, list]:
    tp = _tp()
    p = next(model.parameters())
    example = torch.zeros(1, 3, imgsz, imgsz, device=p.device, dtype=p.dtype)
    flags = [(q, q.requires_grad) for q in model.parameters()]
    for q, _ in flags:  # tracing follows grad_fn: loaded checkpoints have requires_grad False
        q.requires_grad_(True)
    try:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    finally:
        for q, f in flags:
            q.requires_grad_(f)
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for g in dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d]):
        root = g[0].dep.target.module
        groups.append((names[root], g))
    return dg, groups


def conv_sizes(model: nn.Module, imgsz: int) -> dict[nn.Module, tuple[tuple[int, int], tuple[int, int]]]:
    """Each Conv2d's input and output (height, width) at ``imgsz`` (one forward pass of zeros, the model left in
    its mode)."""
    sizes: dict[nn.Module, tuple[tuple[int, int], tuple[int, int]]] = {}

    def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
        sizes[mod] = (tuple(inp[0].shape[-2:]), tuple(out.shape[-2:]))

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    p = next(model.parameters())
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, imgsz, imgsz, device=p.device, dtype=p.dtype))
    finally:
        for h in hs:
            h.remove()
        model.train(was)
    return sizes


def channel_macs(model: nn.Module, groups: list, dg: Any, imgsz: int) -> dict[str, float]:
    """Multiply-accumulates (at ``imgsz``) that one channel of each group costs, summed over its Conv2d members.

    For each group ``(root name, group)`` from :func:`_build_groups`: an output channel of a member conv costs
    ``k*k*in/groups`` MACs per output position, an input channel of a consumer conv ``k*k*out/groups``; both
    times that conv's output positions (measured by one forward pass at ``imgsz``). Linear in ``imgsz**2``, so
    the ratios between groups do not depend on ``imgsz``.
    """
    hw = {m: o[0] * o[1] for m, (_, o) in conv_sizes(model, imgsz).items()}
    cost: dict[str, float] = {}
    for name, g in groups:
        seen, c = set(), 0.0
        for item in g:
            mod = item.dep.target.module
            if not isinstance(mod, nn.Conv2d) or mod not in hw:
                continue
            out = bool(dg.is_out_channel_pruning_fn(item.dep.handler))
            if (id(mod), out) in seen:
                continue
            seen.add((id(mod), out))
            k = mod.kernel_size[0] * mod.kernel_size[1]
            per = k * (mod.in_channels if out else mod.out_channels) / mod.groups
            c += per * hw[mod]
        cost[name] = max(c, 1.0)
    return cost
