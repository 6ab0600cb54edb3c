"""Least-squares reconstruction of channel-pruned layers from the dense model's activations.

For each Conv2d whose *inputs* lost channels, the kept weights are refitted so that its output on
calibration images matches the dense model's output (ridge regression on im2col rows); layers whose inputs
were not pruned are left unchanged. See :func:`reconstruct_layers`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch
import torch.nn as nn

from ..errors import PruneError
from .unstructured import conv_layers

LOGGER = logging.getLogger("yolo_prune_plugin")


class _Stop(Exception):
    pass


def _kept_out_indices(pruned: nn.Module, dense: nn.Module, name: str) -> Optional[torch.Tensor]:
    """Which of the dense conv's output channels the pruned conv kept (matched through the BN running means)."""
    pc, dc = dict(pruned.named_modules())[name], dict(dense.named_modules())[name]
    if pc.out_channels == dc.out_channels:
        return None
    bn_name = name.rsplit(".", 1)[0] + ".bn"
    pb, db = dict(pruned.named_modules()).get(bn_name), dict(dense.named_modules()).get(bn_name)
    if pb is None or db is None:
        raise PruneError(f"reconstruction: {name} lost channels but has no BatchNorm to match them by")
    eq = (pb.running_mean[:, None] == db.running_mean[None, :])
    idx = eq.float().argmax(1)
    if not bool(eq.any(1).all()):
        raise PruneError(f"reconstruction: cannot match the kept channels of {name}")
    return idx


@torch.no_grad()
def reconstruct_layers(pruned: nn.Module, dense: nn.Module, images: torch.Tensor, *, batch_size: int = 8,
                       positions: int = 256, damp: float = 0.01, seed: int = 0,
                       kept: Optional[dict] = None) -> dict:
    """Re-fit every Conv2d of the channel-pruned model to reproduce the dense model's outputs (in place).

    Layer by layer in model order, each conv's weights (and bias, if any) are the ridge least-squares solution
    mapping the *pruned* network's input patches (earlier layers already re-fitted) to the *dense* conv's output on
    the same calibration ``images`` (train split), at ``positions`` random output positions per image. The output
    before BatchNorm is matched, so the BatchNorm statistics stay valid. ``kept``: :attr:`ChannelPruneResult.kept`
    (which output channels each conv kept); without it they are matched through the BN running means, which
    works for trained models only. Returns a summary dict.
    """
    import torch.nn.functional as F

    t0 = time.perf_counter()
    pruned_mods = dict(pruned.named_modules())
    dense_mods = dict(dense.named_modules())
    names = [n for n, m in conv_layers(pruned) if m.groups == 1 and n in dense_mods]
    was = pruned.training, dense.training
    pruned.eval()
    dense.eval()
    g = torch.Generator().manual_seed(seed)
    batches = list(torch.split(images, max(1, batch_size)))
    # dense targets at sampled positions, one pass
    targets: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    picks: dict[str, torch.Tensor] = {}

    def dense_hook(name: str):
        def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
            hw = out.shape[2] * out.shape[3]
            if name not in picks:
                picks[name] = torch.randperm(hw, generator=g)[: min(positions, hw)]
            targets[name].append(out.flatten(2)[:, :, picks[name]].permute(0, 2, 1).reshape(-1, out.shape[1]))
        return hook

    hs = [dense_mods[n].register_forward_hook(dense_hook(n)) for n in names]
    try:
        for x in batches:
            dense(x)
    finally:
        for h in hs:
            h.remove()
    errors = {}
    for name in names:
        conv = pruned_mods[name]
        y = torch.cat(targets.pop(name)).double()
        keep = (torch.tensor(kept[name]) if kept and name in kept else
                None if kept is not None else _kept_out_indices(pruned, dense, name))
        if keep is not None:
            y = y[:, keep]
        xs = []

        def grab(mod: nn.Module, inp: Any) -> None:
            x = inp[0]
            cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
            xs.append(cols[:, :, picks[name]].permute(0, 2, 1).reshape(-1, cols.shape[1]))
            raise _Stop

        h = conv.register_forward_pre_hook(grab)
        try:
            for x in batches:
                try:
                    pruned(x)
                except _Stop:
                    pass
        finally:
            h.remove()
        X = torch.cat(xs).double()
        if conv.bias is not None:
            X = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
        H = X.T @ X
        H.diagonal().add_(damp * H.diagonal().mean().clamp_min(1e-12))
        W = torch.linalg.solve(H, X.T @ y)  # (cols, out)
        old = conv.weight
        if conv.bias is not None:
            conv.bias.copy_(W[-1].to(conv.bias.dtype))
            W = W[:-1]
        conv.weight.copy_(W.T.reshape(old.shape).to(old.dtype))
        errors[name] = round(float(((X @ torch.cat([conv.weight.flatten(1).double().T] + (
            [conv.bias.double()[None]] if conv.bias is not None else []))) - y).pow(2).mean()
            / y.pow(2).mean().clamp_min(1e-12)), 5)
    pruned.train(was[0])
    dense.train(was[1])
    return {"layers": len(names), "images": int(len(images)), "positions": positions,
            "seconds": round(time.perf_counter() - t0, 1),
            "worst_relative_error": max(errors.values()) if errors else None}
