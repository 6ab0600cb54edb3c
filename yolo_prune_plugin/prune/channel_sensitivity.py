"""Measured channel ranking: sensitivity-aware allocation (``channel.allocation: sensitivity``) and the
structured-OBS choice (``channel.importance: obs``).

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

``importance: obs`` (:func:`obs_scores`) also chooses *which* channels go, by structured OBS on the same
statistics: removing input channel ``j`` of a consumer whose other weights are refitted (as the reconstruction
that follows does) raises its output error by ``tr(W_j (Hinv_jj)^-1 W_j^T)``, ``W_j`` the ``k*k`` columns of the
channel and ``Hinv_jj`` their block of the inverse covariance (OBS with column blocks). Each group removes its
channels greedily, cheapest first, updating the consumers' ``W`` and ``Hinv`` after each removal (one
implementation for both structures: the Hessians are :func:`~yolo_prune_plugin.prune.obs.layer_hessian`'s). A
channel's score is its group's cumulative relative error when it goes, so one global threshold allocates the counts
as ``sensitivity`` does.
"""

from __future__ import annotations

import math
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


def _unmeasured(out: dict[str, torch.Tensor], missing: list[str], scores: dict[str, torch.Tensor],
                tops: list[float]) -> None:
    """Scores of the groups without a measurable consumer (into ``out``): their importance order, as the cumulative
    share of their importance scaled to the median of the measured groups' largest errors ``tops``."""
    med = float(torch.median(torch.tensor(tops, dtype=torch.float64))) if tops else 1.0
    for name in missing:
        s = scores[name].double()
        order = torch.sort(s, stable=True).indices
        new = torch.empty(len(s), dtype=torch.float64)
        new[order] = med * s[order].cumsum(0) / s.sum().clamp_min(1e-30)
        out[name] = new


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
        _unmeasured(out, missing, scores, [float(v.max()) for v in out.values()])
    summary = {"sensitivity_layers": len(energy), "sensitivity_images": int(len(images)),
               "sensitivity_seconds": round(time.perf_counter() - t0, 2), "sensitivity_unmeasured": len(missing)}
    return out, summary


class _ObsConsumer:
    """One consumer conv's state during a group's greedy removal: refitted weights and inverse covariance."""

    def __init__(self, conv: nn.Conv2d, H: torch.Tensor, mu: torch.Tensor, damp: float = 0.01) -> None:
        self.k = conv.kernel_size[0] * conv.kernel_size[1]
        self.c = conv.in_channels
        m = mu.to(H).repeat_interleave(self.k)
        H = (H - m[:, None] * m[None, :]).cpu()  # the refit has an intercept: the mean is compensated
        eye = torch.eye(len(H), dtype=H.dtype)
        scale = float(H.diagonal().mean().clamp_min(1e-12))
        self.W = conv.weight.detach().flatten(1).double().cpu()
        for _ in range(6):  # the subsampled second moment minus the full mean can be slightly indefinite
            L, info = torch.linalg.cholesky_ex(H + damp * scale * eye)
            if int(info) == 0:
                break
            damp *= 10
        H = H + damp * scale * eye
        self.total = float(torch.einsum("oi,ij,oj->", self.W, H, self.W).clamp_min(1e-30))
        self.Hinv = torch.cholesky_inverse(L)
        self.gone = torch.zeros(self.c, dtype=torch.bool)

    def costs(self) -> torch.Tensor:
        """Relative output error added by removing each input channel now (inf for channels already gone)."""
        k, c = self.k, self.c
        D = self.Hinv.view(c, k, c, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1).clone()  # (c, k, k) blocks
        D[self.gone] = torch.eye(k, dtype=D.dtype)  # removed: zero blocks (their cost is inf below)
        Wb = self.W.view(-1, c, k).permute(1, 0, 2)  # (c, out, k)
        cost = (torch.linalg.solve(D, Wb.transpose(1, 2)).transpose(1, 2) * Wb).sum((1, 2))
        return torch.where(self.gone, torch.full_like(cost, float("inf")), cost / self.total)

    def remove(self, j: int) -> None:
        B = slice(j * self.k, (j + 1) * self.k)
        Dinv = torch.linalg.inv(self.Hinv[B, B])
        rows = self.Hinv[B, :]
        self.W -= self.W[:, B] @ Dinv @ rows  # OBS compensation: the other columns absorb channel j
        self.Hinv -= self.Hinv[:, B] @ Dinv @ rows
        self.W[:, B] = 0.0
        self.gone[j] = True


@torch.no_grad()
def obs_scores(model: nn.Module, groups: list, dg: Any, fallback: dict[str, torch.Tensor], images: torch.Tensor,
               *, batch_size: int = 8, max_ratio: float = 0.75) -> tuple[dict, dict]:
    """``channel.importance: obs`` scores (see the module docstring) for every group in ``fallback`` (root name ->
    a data-free importance, used for groups without a measurable consumer, scaled as in
    :func:`sensitivity_scores`). Each group is removed greedily up to ``max_ratio`` of its channels; the rest keep
    their fallback order above that. Returns ``(scores, summary)``."""
    t0 = time.perf_counter()
    cons = {n: _consumers(g, dg) for n, g in groups if n in fallback}
    convs = list(dict.fromkeys(c for v in cons.values() for c, _, _ in v))
    stats = consumer_statistics(model, convs, images, batch_size)
    out: dict[str, torch.Tensor] = {}
    missing, tops = [], []
    for name, base in progress(list(fallback.items()), desc="channel obs: groups"):
        n = len(base)
        states = []
        for conv, local, root in cons.get(name, []):
            if conv in stats:
                pos = torch.full((n,), -1, dtype=torch.long)
                pos[root] = local
                states.append((_ObsConsumer(conv, *stats[conv]), pos))
        if not states:
            missing.append(name)
            continue
        steps = min(n - 1, int(math.ceil(max_ratio * n)))
        order, curve, err = [], [], 0.0
        left = torch.ones(n, dtype=torch.bool)
        for _ in range(steps):
            total = torch.zeros(n, dtype=torch.float64)
            for st, pos in states:
                ok = pos >= 0
                total[ok] += st.costs()[pos[ok]]
            total = torch.where(left, total / len(states), torch.full_like(total, float("inf")))
            r = int(torch.argmin(total))
            err += float(total[r])
            order.append(r)
            curve.append(err)
            left[r] = False
            for st, pos in states:
                if pos[r] >= 0:
                    st.remove(int(pos[r]))
        rest = [int(i) for i in torch.sort(base, descending=False, stable=True).indices if left[i]]
        new = torch.empty(n, dtype=torch.float64)
        top = curve[-1] if curve else 0.0
        tops.append(top)
        for i, r in enumerate(order + rest):  # non-decreasing along the removal order; ties broken by position
            new[r] = (curve[i] if i < len(curve) else top * 2 + 1.0) + 1e-9 * (i + 1) / n
        out[name] = new
    if missing:
        _unmeasured(out, missing, fallback, tops)
    return out, {"obs_layers": len(stats), "obs_images": int(len(images)),
                 "obs_seconds": round(time.perf_counter() - t0, 2), "obs_unmeasured": len(missing)}
