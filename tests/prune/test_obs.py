"""Data-aware pruning (``obs``: SparseGPT-style reconstruction), its calibration images, and LAMP scores."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from yolo_prune_plugin.prune import allocation as alloc, obs as obs_module
from yolo_prune_plugin.prune.calibration import load_calibration_images
from yolo_prune_plugin.config import config_from_dict
from yolo_prune_plugin.errors import ConfigError
from yolo_prune_plugin.prune.unstructured import conv_layers, prune_model, sparsity_stats


# small tensors: one intra-op thread (conftest) avoids oversubscription on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------
# fixtures (``backend`` and ``one_thread`` come from conftest.py)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    """Smooth random 'images' (blurred noise) at 64 px."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    return torch.nn.functional.interpolate(x, size=64, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def pretrained(backend, shared, coco8_yaml):
    """Shared COCO-pretrained yolov5n and four coco8 training images at 128 px."""
    model = backend.attempt_load(shared / "weights" / "yolov5n.pt", device="cpu", fuse=False).eval()
    return model, load_calibration_images(coco8_yaml, 128, n=4)


def _layer_inputs(model, conv, x):
    box = {}
    h = conv.register_forward_pre_hook(lambda m, inp: box.setdefault("x", inp[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    return box["x"]




# ---------------------------------------------------------------------------------------------------
# SparseGPT on one layer
# ---------------------------------------------------------------------------------------------------
def _reference_sparsegpt(W, H, k_per_block, blocksize, damp=0.01):
    """Column-by-column SparseGPT (Frantar & Alistarh 2023, Alg. 1) with per-block mask selection."""
    W = W.clone()
    cols = W.shape[1]
    H = H.double() + damp * torch.diag(H.double()).mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True).float()
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        score = W1 ** 2 / torch.diag(Hinv1).view(1, -1) ** 2
        m = torch.ones(score.numel(), dtype=torch.bool)
        m[torch.argsort(score.flatten(), stable=True)[:k_per_block]] = False
        m = m.view_as(W1)
        keep[:, i1:i2] = m
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            q = w * m[:, i]
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, keep


def _correlated_inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cols, generator=g) @ (torch.randn(cols, cols, generator=g) * 0.3) \
        + torch.randn(n, cols, generator=g)


@pytest.mark.parametrize("blocksize", [16, 32])
def test_sparsegpt_layer_matches_columnwise_reference(blocksize):
    rows, cols = 12, 64
    X = _correlated_inputs(400, cols)
    H = X.T @ X / 400
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    k_per_block = rows * blocksize // 2
    ref_w, ref_keep = _reference_sparsegpt(W, H, k_per_block, blocksize)
    new_w, keep = obs_module.sparsegpt_layer(W, H, k_per_block * (cols // blocksize), blocksize=blocksize)
    assert torch.equal(keep, ref_keep)
    assert torch.allclose(new_w, ref_w, atol=1e-4, rtol=1e-4)
    assert int((~keep).sum()) == k_per_block * (cols // blocksize)
    assert torch.equal(new_w == 0, ~keep)


@pytest.mark.parametrize("k", [1, 37, 200, 383])
@pytest.mark.parametrize("mask_block", [None, 0, 10])
def test_sparsegpt_layer_exact_count_and_forced(k, mask_block):
    rows, cols = 6, 64
    X = _correlated_inputs(300, cols, seed=2)
    H = X.T @ X
    H[:, 5] = H[5, :] = 0  # a dead input
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3))
    forced = torch.zeros_like(W, dtype=torch.bool)
    forced[0, :1] = True
    new_w, keep = obs_module.sparsegpt_layer(W, H, k, blocksize=16, mask_block=mask_block, forced=forced)
    assert int((~keep).sum()) == k
    assert not keep[forced].any()
    assert torch.equal(new_w == 0, ~keep)


def test_sparsegpt_layer_survives_singular_hessian():
    """Rank-deficient inputs and no dampening: the float64 / extra-dampening fallback still prunes."""
    X = _correlated_inputs(10, 48, seed=4)  # 10 samples, 48 columns: rank <= 10
    H = X.T @ X
    W = torch.randn(4, 48, generator=torch.Generator().manual_seed(5))
    new_w, keep = obs_module.sparsegpt_layer(W, H, 100, damp=0.0)
    assert torch.isfinite(new_w).all() and int((~keep).sum()) == 100


# ---------------------------------------------------------------------------------------------------
# the obs method through prune_model
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amount, include, zero_first", [
    (0.3, (), 0),
    (0.5, (), 50),          # 50 weights already exactly zero
    (0.7, ("model.2*", "model.24.*"), 0),
])
def test_obs_exact_global_sparsity_on_yolov5(small_yolo, calib, amount, include, zero_first):
    model = copy.deepcopy(small_yolo)
    layers = conv_layers(model, include)
    if zero_first:
        with torch.no_grad():
            layers[3][1].weight.view(-1)[:zero_first] = 0
    model.train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn_before = bn.running_mean.clone()
    out_of_scope = {n: m.weight.clone() for n, m in conv_layers(model) if (n, m) not in layers}
    in_scope = {n: m.weight.clone() for n, m in layers}

    res = prune_model(model, amount, "obs", include=include, calibration=calib, log=False)

    total = sum(m.weight.numel() for _, m in layers)
    assert sparsity_stats(model, layers).zeros == round(amount * total)
    assert res.after.zeros == round(amount * total)
    assert model.training and torch.equal(bn.running_mean, bn_before)  # calibration ran in eval mode
    for n, m in conv_layers(model):
        if n in out_of_scope:
            assert torch.equal(m.weight, out_of_scope[n])
    # reconstruction: kept weights moved, not just masked
    assert sum(int(((m.weight != in_scope[n]) & (m.weight != 0)).sum()) for n, m in layers) > 0
    assert res.extra["calibration_images"] == calib.shape[0] and not res.extra["fallback_layers"]
    assert 0 <= res.extra["mean_rel_error"] < 1
    with torch.no_grad():
        assert torch.isfinite(model.eval()(calib)[0]).all()


def test_obs_matches_layer_by_layer_reference(small_yolo, calib):
    """One forward with pruning pre-hooks == pruning layer by layer, each from a fresh forward of the
    model pruned so far (every layer sees inputs from the pruned layers upstream)."""
    amount = 0.5
    from yolo_prune_plugin.prune.registry import ObsOptions

    fast = copy.deepcopy(small_yolo)  # one pass, full Hessians (the defaults are 2 passes, capped rows)
    prune_model(fast, amount, "obs", calibration=calib, log=False, options=ObsOptions(steps=1, samples_per_column=0))

    ref = copy.deepcopy(small_yolo).eval()
    layers = conv_layers(ref)
    counts = dict(zip([id(m) for _, m in layers], alloc.layer_counts(layers, amount)))
    images = torch.cat([calib, calib.flip(-1)])  # the default calibrates on mirrored images too
    order: list[nn.Conv2d] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: order.append(mod)) for _, m in layers]
    with torch.no_grad():
        ref(images)
    for h in hooks:
        h.remove()
    assert len(order) == len(layers) and order != [m for _, m in layers]  # C3: cv3 runs after m
    with torch.no_grad():
        for conv in order:
            x = _layer_inputs(ref, conv, images)
            W0 = conv.weight.flatten(1)
            w, _ = obs_module.sparsegpt_layer(W0, obs_module.layer_hessian(conv, x), counts[id(conv)], mask_block=0)
            conv.weight.copy_(w.view_as(conv.weight))
    for (n, a), (_, b) in zip(conv_layers(fast), layers):
        assert torch.equal(a.weight == 0, b.weight == 0), n
        assert torch.allclose(a.weight, b.weight, atol=1e-5, rtol=1e-4), n


class _Unusual(nn.Module):
    """A non-YOLOv5 model: a grouped conv, and a conv that forward never calls."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.SiLU(),
                                  nn.Conv2d(8, 4, 1))
        self.unused = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.body(x)


def test_obs_generic_model_grouped_and_unreached_convs_fall_back():
    torch.manual_seed(0)
    model = _Unusual().eval()
    res = prune_model(model, 0.6, "obs", calibration=torch.rand(2, 3, 16, 16), log=False)
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    assert res.after.zeros == round(0.6 * total)
    assert res.extra["fallback_layers"] == ["body.3", "unused"]


@pytest.mark.parametrize("options", [
    {"allocation": "hessian"},
    {"allocation": "lamp", "protect": ["model.24.*"], "flip": False},
    {"allocation": "uniform", "mask_block": None, "blocksize": 32, "damp": 0.1},
])
def test_obs_options_keep_exact_sparsity(small_yolo, calib, options):
    model = copy.deepcopy(small_yolo)
    obs = config_from_dict({"obs": options}).obs  # every obs option is reachable from the config
    res = prune_model(model, 0.45, "obs", calibration=calib, log=False, options=obs)
    total = sum(m.weight.numel() for _, m in conv_layers(model))
    assert res.after.zeros == round(0.45 * total)
    assert res.extra["allocation"] == options["allocation"] and res.extra["flip"] == options.get("flip", True)
    for n, m in conv_layers(model):
        if any(n.startswith(p[:-1]) for p in options.get("protect", ())):
            assert int((m.weight == 0).sum()) == 0


@pytest.mark.parametrize("amount, steps", [(0.5, 2), (0.45, 3)])
def test_obs_steps_exact_and_equal_to_successive_passes(small_yolo, calib, amount, steps):
    """``steps: K`` = K obs passes at amount * i / K on the model pruned so far; the zeros of a pass stay
    zero and the final count is exact."""
    model = copy.deepcopy(small_yolo)
    obs = config_from_dict({"obs": {"steps": steps}}).obs  # reachable from the config
    res = prune_model(model, amount, "obs", calibration=calib, log=False, options=obs)
    total = sum(m.weight.numel() for _, m in conv_layers(model))
    assert res.after.zeros == round(amount * total)
    assert res.extra["steps"] == steps and res.extra["step_amounts"][-1] == amount
    assert len(res.extra["step_amounts"]) == steps

    ref = copy.deepcopy(small_yolo)
    layers = conv_layers(ref)
    zeros_before = None
    for i in range(1, steps + 1):
        a = amount if i == steps else amount * i / steps
        masks, _ = obs_module.obs_prune(ref, layers, a, calib, steps=1)
        zeros = [m.weight == 0 for _, m in layers]
        assert sum(int(z.sum()) for z in zeros) == round(a * total)
        if zeros_before is not None:  # pruned weights stay pruned
            assert all(bool((zb <= z).all()) for zb, z in zip(zeros_before, zeros))
        zeros_before = zeros
    for (n, a_), (_, b) in zip(conv_layers(model), layers):
        assert torch.equal(a_.weight == 0, b.weight == 0), n
        assert torch.allclose(a_.weight, b.weight, atol=1e-5, rtol=1e-4), n

    one = copy.deepcopy(small_yolo)
    prune_model(one, amount, "obs", calibration=calib, log=False, options=config_from_dict({"obs": {"steps": 1}}).obs)
    assert any(not torch.equal(a_.weight == 0, b.weight == 0) for (_, a_), (_, b)
               in zip(conv_layers(one), conv_layers(model)))  # gradual is not the one-shot result


def test_obs_rejects_bad_steps(small_yolo, calib):
    with pytest.raises(ConfigError, match="steps must be an integer >= 1"):
        model = copy.deepcopy(small_yolo)
        obs_module.obs_prune(model, conv_layers(model), 0.3, calib, steps=0)


def test_obs_rejects_bad_calibration(small_yolo):
    with pytest.raises(ConfigError, match="calibration"):
        prune_model(copy.deepcopy(small_yolo), 0.3, "obs", calibration=torch.rand(3, 64, 64), log=False)


@pytest.mark.parametrize("source", ["random-init", "pretrained+coco8"])
@pytest.mark.parametrize("layer", ["model.2.cv1.conv", "model.3.conv", "model.8.m.0.cv2.conv"])
@pytest.mark.parametrize("amount", [0.3, 0.6])
def test_obs_output_error_below_magnitude(request, small_yolo, calib, source, layer, amount):
    """On one real YOLOv5 conv and its real inputs, OBS pruning + reconstruction beats magnitude pruning."""
    model, x = (small_yolo, calib) if source == "random-init" else request.getfixturevalue("pretrained")
    conv = dict(model.named_modules())[layer]
    inp = _layer_inputs(model, conv, x)
    W = conv.weight.detach().flatten(1)
    k = round(amount * W.numel())
    X = obs_module._unfold(conv, inp)
    H = X.T @ X / X.shape[0]

    obs_w, keep = obs_module.sparsegpt_layer(W, H, k)
    mag = W.clone().flatten()
    mag[torch.argsort(mag.abs(), stable=True)[:k]] = 0
    mag = mag.view_as(W)

    def out_err(w):
        return float(((X @ (W - w).T) ** 2).sum())

    assert int((~keep).sum()) == k == int((mag == 0).sum())
    assert out_err(obs_w) < 0.8 * out_err(mag)


# ---------------------------------------------------------------------------------------------------
# calibration images
# ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_obs_on_cuda(small_yolo, calib):
    model = copy.deepcopy(small_yolo).cuda()
    res = prune_model(model, 0.5, "obs", calibration=calib.cuda(), log=False)
    total = sum(m.weight.numel() for _, m in conv_layers(model))
    assert res.after.zeros == round(0.5 * total)
    assert all(m.weight.is_cuda for _, m in conv_layers(model))
    assert math.isfinite(res.extra["mean_rel_error"])


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(4, 8, 1), nn.Conv2d(4, 8, 3, 2, 1)])
def test_hessian_row_cap(conv):
    """samples_per_column caps the im2col rows of a layer's Hessian: a cap above what the batch has is exact, a
    lower one is a seeded subset of positions (same every call) whose estimate stays close to the full one."""
    torch.manual_seed(0)
    x = torch.randn(6, 4, 32, 32)
    full = obs_module.layer_hessian(conv, x)
    cols = conv.weight[0].numel()
    assert torch.equal(obs_module.layer_hessian(conv, x, samples_per_column=10_000), full)
    capped = obs_module.layer_hessian(conv, x, chunk=4, samples_per_column=32)
    assert torch.equal(capped, obs_module.layer_hessian(conv, x, chunk=4, samples_per_column=32))
    assert not torch.equal(capped, full)
    assert torch.linalg.norm(capped - full) / torch.linalg.norm(full) < 0.2
    assert capped.shape == (cols, cols)


def test_schedule_steps_use_global_for_auto():
    from yolo_prune_plugin.config import PruneConfig, data_free_method

    assert data_free_method(PruneConfig()) == "global"
    assert data_free_method(PruneConfig(method="lamp")) == "lamp"


def test_samples_per_column_from_the_config(small_yolo, calib):
    """The Hessian row cap is reachable as ``obs: {samples_per_column: N}`` and reported; negative is refused."""
    for n in (0, 64):
        obs = config_from_dict({"obs": {"samples_per_column": n}}).obs
        res = prune_model(copy.deepcopy(small_yolo), 0.5, "obs", calibration=calib, log=False, options=obs)
        assert obs.samples_per_column == n and res.extra["samples_per_column"] == n
    with pytest.raises(ConfigError, match=r"'obs.samples_per_column' must be >= 0"):
        config_from_dict({"obs": {"samples_per_column": -1}})
