"""Sensitivity-aware channel allocation (``channel.allocation: sensitivity``).

How many channels each dependency group loses is decided by a measured sensitivity curve instead of raw
magnitude ranked across layers of different width and resolution (NetAdapt / FastNAS style, but measured in
closed form): for every group, the consumers' inputs on calibration images give ``H = E[x x^T]`` of each
consumer Conv2d's im2col columns (:func:`yolo_prune_plugin.prune.obs.layer_hessian`); removing a set ``S`` of
the group's channels changes a consumer's output by ``W_S x_S``, whose energy relative to the consumer's whole
output is ``tr(W_S H_SS W_S^T) / tr(W H W^T)``. With the group's channels ordered by their importance (the usual
l1/taylor/... score), the curve ``e_g(m)`` — mean relative output error of the group's consumers when its ``m``
least important channels go — is exact for every ``m`` from one channel-level matrix per consumer. Each channel's
allocation score is the error its group reaches when it goes; one global threshold on these scores, bisected to
reach ``amount`` by :func:`yolo_prune_plugin.prune.channel.channel_prune`, prunes every group up to the same
relative error. With ``centered`` (mean compensation, FLAP) the covariance replaces the second moment: the
removed channels' mean is absorbed by the consumer's bias.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

from ..utils.progress import progress
from .obs import layer_hessian, supports_obs


def _consumers(group: Any, dg: Any) -> list[tuple[nn.Conv2d, torch.Tensor, torch.Tensor]]:
    """``(conv, local input-channel idxs, root idxs)`` of every Conv2d whose inputs the group prunes."""
    out = []
    for i, item in enumerate(group):
        mod = item.dep.target.module
        if isinstance(mod, nn.Conv2d) and dg.is_in_channel_pruning_fn(item.dep.handler) and supports_obs(mod):
            out.append((mod, torch.as_tensor(list(item.idxs)), torch.as_tensor(list(group[i].root_idxs))))
    return out


@torch.no_grad()
def consumer_statistics(model: nn.Module, convs: list[nn.Conv2d], images: torch.Tensor, batch_size: int = 8,
                        samples_per_column: int = 256) -> dict[nn.Conv2d, tuple[torch.Tensor, torch.Tensor]]:
    """``{conv: (H = E[x x^T] of its im2col columns (float64), per-input-channel mean of x)}`` on ``images``
    (one eval-mode forward pass in batches; high-resolution layers subsampled as in ``obs``)."""
    stats: dict[nn.Conv2d, list] = {c: [None, None, 0] for c in convs}

    def hook(mod: nn.Module, inp: Any) -> None:
        x = inp[0]
        s = stats[mod]
        H = layer_hessian(mod, x, chunk=len(x), samples_per_column=samples_per_column) * len(x)
        mu = x.float().mean((2, 3)).sum(0).double()
        s[0] = H if s[0] is None else s[0] + H
        s[1] = mu if s[1] is None else s[1] + mu
        s[2] += len(x)

    p = next(model.parameters())
    hs = [c.register_forward_pre_hook(hook) for c in convs]
    was = model.training
    try:
        model.eval()
        for x in progress(torch.split(images, max(1, batch_size)), desc="channel sensitivity: statistics"):
            model(x.to(device=p.device, dtype=p.dtype))
    finally:
        for h in hs:
            h.remove()
        model.train(was)
    return {c: (s[0] / s[2], s[1] / s[2]) for c, s in stats.items() if s[2]}


def _channel_energy(conv: nn.Conv2d, H: torch.Tensor, mu: torch.Tensor, centered: bool) -> torch.Tensor:
    """``G[i, j]``: the output-energy cross term of input channels ``i`` and ``j`` (summed over kernel taps)."""
    W = conv.weight.detach().flatten(1).double()  # (out, cin*k*k)
    k = conv.kernel_size[0] * conv.kernel_size[1]
    if centered:  # covariance: the mean of removed channels is compensated through the bias
        m = mu.to(H).repeat_interleave(k)
        H = H - m[:, None] * m[None, :]
    G = H * (W.T @ W)
    c = conv.in_channels
    return G.reshape(c, k, c, k).sum((1, 3)).cpu()  # small (c, c); the allocation's bookkeeping is on the CPU


def sensitivity_scores(model: nn.Module, groups: list, dg: Any, scores: dict[str, torch.Tensor],
                       images: torch.Tensor, *, batch_size: int = 8, centered: bool = False) -> tuple[dict, dict]:
    """Allocation scores (see the module docstring) for every group in ``scores`` (root name -> importance).

    Returns ``(new scores, summary)``; a channel's new score is its group's relative consumer error when it and every
    less important channel of the group are removed (non-decreasing within the group, ties broken by importance), so
    :func:`yolo_prune_plugin.prune.channel._plan` removes the same channels inside a group as the importance would,
    but allocates the counts across groups by measured error. A group with no measurable consumer keeps its
    importance ranking, scaled by the median error curve.
    """
    t0 = time.perf_counter()
    cons = {n: _consumers(g, dg) for n, g in groups if n in scores}
    convs = list(dict.fromkeys(c for v in cons.values() for c, _, _ in v))
    stats = consumer_statistics(model, convs, images, batch_size)
    energy = {}
    for c in progress(convs, desc="channel sensitivity: layers"):
        if c in stats:
            G = _channel_energy(c, *stats[c], centered)
            energy[c] = (G, float(G.sum().clamp_min(1e-30)))
    out: dict[str, torch.Tensor] = {}
    missing = []
    for name, s in scores.items():
        order = torch.sort(s, stable=True).indices  # least important first (root indices)
        n = len(s)
        curve = torch.zeros(n, dtype=torch.float64)
        used = 0
        for conv, local, root in cons.get(name, []):
            if conv not in energy:
                continue
            G, total = energy[conv]
            pos = torch.full((n,), -1, dtype=torch.long)
            pos[root] = local  # root channel -> this consumer's input channel
            idx = pos[order]
            valid = idx >= 0
            P = torch.zeros(n, n, dtype=torch.float64)
            sub = idx[valid]
            vi = valid.nonzero().flatten()
            P[vi[:, None], vi[None, :]] = G[sub[:, None], sub[None, :]]
            curve += P.cumsum(0).cumsum(1).diagonal() / total
            used += 1
        if not used:
            missing.append(name)
            continue
        curve = torch.cummax(curve / used, 0).values
        new = torch.empty(n, dtype=torch.float64)  # float64: the tie-break survives
        new[order] = curve + 1e-9 * torch.arange(1, n + 1, dtype=torch.float64) / n
        out[name] = new
    if missing:
        med = float(torch.median(torch.stack([v.max() for v in out.values()]))) if out else 1.0
        for name in missing:
            s = scores[name].double()
            order = torch.sort(s, stable=True).indices
            frac = s[order].cumsum(0) / s.sum().clamp_min(1e-30)
            new = torch.empty(len(s), dtype=torch.float64)
            new[order] = med * frac
            out[name] = new
    summary = {"sensitivity_layers": len(energy), "sensitivity_images": int(len(images)),
               "sensitivity_seconds": round(time.perf_counter() - t0, 2), "sensitivity_unmeasured": len(missing)}
    return out, summary
