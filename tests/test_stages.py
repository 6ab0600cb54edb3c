"""stages.py: the prune stage (zeros or channels, BatchNorm recalibration, the calibration cache) on real small
YOLOv5 models, the fine-tune stage's checks around a stubbed YOLOv5 training, and where a fine-tune runs."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from yolo_prune_plugin import stages
from yolo_prune_plugin.backend.evaluation import EvalSettings, resolve_data
from yolo_prune_plugin.config import config_from_dict
from yolo_prune_plugin.errors import PruneError
from yolo_prune_plugin.prune.unstructured import conv_layers, sparsity_stats
from yolo_prune_plugin.report import ReportEntry
from yolo_prune_plugin.stages import RunContext, finetune_location, finetune_stage, prune_stage, source_model

from testkit import save_checkpoint

CPU = torch.device("cpu")


def _ctx(backend, settings=None):
    return RunContext(backend, CPU, 64, settings=settings)


def _ckpt(model):
    """A checkpoint dict as YOLOv5 saves it (fp16 model, no EMA)."""
    return {"model": copy.deepcopy(model).half(), "ema": None}


def _widths(model):
    return [(m.out_channels, m.in_channels) for _, m in conv_layers(model)]


@pytest.fixture
def settings(backend, tiny_data):
    return EvalSettings(resolve_data(tiny_data, backend), 64, 2, CPU, workers=0)


def test_source_model_is_ema_first():
    a, b = nn.Linear(1, 1), nn.Linear(1, 1)
    assert source_model({"ema": a, "model": b}) is a
    assert source_model({"ema": None, "model": b}) is b


@pytest.mark.parametrize("device,expected", [(torch.device("cpu"), "cpu"), (torch.device("cuda", 1), "1"),
                                             (torch.device("cuda"), "0")])
def test_export_device(backend, device, expected):
    assert RunContext(backend, device, 64).export_device == expected


# -- unstructured ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amount", [0.3, 0.6])
def test_unstructured_prune_gives_the_exact_sparsity_on_a_float_copy(backend, small_model, amount, one_thread):
    ckpt = _ckpt(small_model)
    src = ckpt["model"]
    src_zeros = sparsity_stats(src).zeros  # a few fp16 underflows
    cfg = config_from_dict({"amount": amount, "method": "global"})
    model, done = prune_stage(ckpt, cfg, _ctx(backend))
    stats = sparsity_stats(model)
    assert stats.zeros == pytest.approx(amount * stats.weights, abs=1)  # one global threshold: exact
    assert done["method"] == "global" and done["stats_before"]["sparsity"] < 1e-4
    assert model is not src and not model.training and next(model.parameters()).dtype == torch.float32
    assert next(src.parameters()).dtype == torch.float16 and sparsity_stats(src).zeros == src_zeros  # untouched
    assert "recalibration" not in done and "channels" not in done  # unstructured: no BatchNorm re-estimate by default


def test_scope_limits_the_zeros(backend, small_model, one_thread):
    cfg = config_from_dict({"amount": 0.5, "method": "global", "exclude": ["model.24.*"]})
    model, _ = prune_stage(_ckpt(small_model), cfg, _ctx(backend))
    head = sparsity_stats(model, [(n, m) for n, m in conv_layers(model) if n.startswith("model.24.")])
    scope = sparsity_stats(model, conv_layers(model, exclude=["model.24.*"]))
    assert head.zeros == 0 and scope.zeros == pytest.approx(0.5 * scope.weights, abs=1)


def test_auto_method_without_data_is_global_and_says_why(backend, small_model, caplog, one_thread):
    cfg = config_from_dict({"amount": 0.3})  # method: auto
    with caplog.at_level(logging.INFO, logger="yolo_prune_plugin"):
        _, done = prune_stage(_ckpt(small_model), cfg, _ctx(backend))
    assert done["method"] == "global"
    assert done["details"]["auto"].startswith("auto -> global: no dataset to draw calibration images from")
    assert "method auto -> global" in caplog.text


@pytest.mark.parametrize("cfg,match", [
    ({"method": "obs"}, r"^method 'obs' needs train-split images: pass --data"),
    ({"method": "global", "bn_recalibration": {"images": 4}}, r"^bn_recalibration needs train-split images"),
])
def test_data_aware_steps_without_data_are_refused(backend, small_model, cfg, match, one_thread):
    with pytest.raises(PruneError, match=match):
        prune_stage(_ckpt(small_model), config_from_dict({"amount": 0.3, **cfg}), _ctx(backend))


def test_bn_recalibration_on_train_images_and_the_cache(backend, small_model, settings, monkeypatch, caplog,
                                                        one_thread):
    """BatchNorm statistics re-estimated from the train split; with a cache (a budget search) the images are
    read once for every amount."""
    from yolo_prune_plugin.prune import calibration as cal  # (yolo_prune_plugin.prune is also the api function)

    reads = []
    real = cal.load_calibration_images

    def spy(data, imgsz, **kw):
        reads.append((imgsz, kw["n"]))
        return real(data, imgsz, **kw)

    monkeypatch.setattr(cal, "load_calibration_images", spy)
    cfg = config_from_dict({"amount": 0.3, "method": "global", "bn_recalibration": {"images": 2, "batch_size": 2}})
    plain, _ = prune_stage(_ckpt(small_model), config_from_dict({"amount": 0.3, "method": "global"}),
                           _ctx(backend, settings))
    cache: dict = {}
    with caplog.at_level(logging.INFO, logger="yolo_prune_plugin"):
        model, done = prune_stage(_ckpt(small_model), cfg, _ctx(backend, settings), cache=cache)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert done["recalibration"]["layers"] == n_bn and done["recalibration"]["images"] == 2
    assert "BatchNorm statistics re-estimated on 2 train images" in caplog.text
    key = "model.0.bn.running_mean"
    assert not torch.allclose(model.state_dict()[key], plain.state_dict()[key])  # re-estimated, not the checkpoint's
    assert all(torch.equal(a.weight, b.weight) for (_, a), (_, b) in zip(conv_layers(model), conv_layers(plain)))
    assert reads == [(64, 2)] and cache["bn"].shape == (2, 3, 64, 64)
    prune_stage(_ckpt(small_model), cfg.with_overrides(amount=0.5), _ctx(backend, settings), cache=cache)
    assert reads == [(64, 2)]  # the second amount reused the cached images


# -- channel -----------------------------------------------------------------------------------------------------
def test_channel_structure_gives_a_smaller_working_model(backend, tiny_model, one_thread):
    tiny_model.eval()
    ckpt = _ckpt(tiny_model)
    cfg = config_from_dict({"amount": 0.3, "structure": "channel", "bn_recalibration": {"images": 0}})
    model, done = prune_stage(ckpt, cfg, _ctx(backend))
    before = sum(p.numel() for p in ckpt["model"].parameters())
    after = sum(p.numel() for p in model.parameters())
    assert after < before and _widths(model) != _widths(ckpt["model"])
    assert sparsity_stats(model).zeros == 0  # channels removed, not zeroed
    assert done["channels"]["importance"] == "l1"  # without data: no Taylor ranking
    assert "reconstruction" not in done and "recalibration" not in done
    with torch.no_grad():
        y = model(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))[0]
    assert y.shape[-1] == 5 + 3 and torch.isfinite(y).all()


# -- helpers ------------------------------------------------------------------------------------------------------
def test_cached_loads_once_per_key():
    calls = []

    def load():
        calls.append(1)
        return len(calls)

    cache: dict = {}
    assert stages._cached(cache, "k", load) == 1 and stages._cached(cache, "k", load) == 1 and calls == [1]
    assert stages._cached(None, "k", load) == 2 and stages._cached(None, "k", load) == 3  # no cache: every time


def test_finetune_location(tmp_path):
    run = tmp_path / "runs" / "exp3"
    assert finetune_location(run / "weights" / "best.pt") == (tmp_path / "runs", "exp3_finetune",
                                                              run / "hyp_finetune.yaml")
    assert finetune_location(tmp_path / "model.pt") == (tmp_path, "model_finetune", None)


# -- fine-tune stage around a stubbed YOLOv5 training ----------------------------------------------------------------
def _saved(model, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(model, path)


def _entry(ckpt: Path) -> ReportEntry:
    return ReportEntry(checkpoint=str(ckpt), output=str(ckpt.with_name("best_pruned.pt")), mode="finetune",
                       method="global", amount=0.5, device="cpu", imgsz=64)


def _stub_finetune(monkeypatch, tuned_file: Path, seen: dict):
    import yolo_prune_plugin.training.finetune as F

    assert tuned_file.is_file()

    def finetune_checkpoint(weights, base_opt, epochs, **kw):
        seen.update(weights=weights, epochs=epochs, **kw)
        return SimpleNamespace(best=tuned_file, leaks={"live model": 0}, imgsz=64, warmup=False, loop={}, distill=None,
                               hyp={"lr0": 0.001}, save_dir=tuned_file.parent, seconds=1.0, history=[{"epoch": 0}],
                               kept={"file": tuned_file.name, "rule": kw.get("keep"), "epoch": 0})

    monkeypatch.setattr(F, "finetune_checkpoint", finetune_checkpoint)


@pytest.mark.parametrize("leak", [False, True])
def test_finetune_stage_holds_the_zeros_and_refuses_leaks(backend, small_model, tmp_path, monkeypatch, leak,
                                                          one_thread):
    src = save_checkpoint(small_model, tmp_path / "best.pt")
    cfg = config_from_dict({"amount": 0.5, "method": "global", "finetune": {"epochs": 2}})
    pruned, _ = prune_stage(_ckpt(small_model), cfg, _ctx(backend))
    out = save_checkpoint(pruned, tmp_path / "best_pruned.pt")
    tuned = copy.deepcopy(pruned)
    if leak:
        with torch.no_grad():
            tuned.model[0].conv.weight.fill_(0.5)  # a pruned position trained back to non-zero
    seen: dict = {}
    _stub_finetune(monkeypatch, _saved(tuned, tmp_path / "ft" / "best.pt"), seen)
    entry = _entry(src)
    if leak:
        with pytest.raises(PruneError, match=r"best\.pt: pruned weights became non-zero during fine-tuning .*"
                                             r"best_pruned\.pt still holds the one-shot pruned model"):
            finetune_stage(out, pruned, entry, cfg, _ctx(backend))
        assert entry.leaks["best_pruned.pt"] == int((pruned.model[0].conv.weight == 0).sum())
        return
    ckpt, model = finetune_stage(out, pruned, entry, cfg, _ctx(backend))
    masked = int(sum((m.weight == 0).sum() for _, m in conv_layers(pruned)))
    assert seen["weights"] == out and seen["epochs"] == 2 and seen["keep_architecture"] is False
    assert seen["project"] == tmp_path and seen["name"] == "best_finetune" and seen["hyp_path"] is None
    assert sum(int(v.sum()) for v in seen["masks"].values()) == masked  # the zeros are what training holds
    assert entry.leaks == {"live model": 0, "best_pruned.pt": 0} and entry.finetune["masked_weights"] == masked
    assert entry.finetune["epochs"] == 2 and entry.finetune["lr0"] == 0.001
    assert seen["keep"] == "last" and seen["lr_schedule"] == "run"  # keep auto: last.pt, then compared with best.pt
    assert entry.finetune["kept"]["rule"] == "auto" and entry.finetune["lr_schedule"] == "run"
    assert next(model.parameters()).dtype == torch.float32 and model is source_model(ckpt)  # the fine-tuned file's
    assert torch.equal(model.model[0].conv.weight, tuned.model[0].conv.weight.half().float())


def test_finetune_stage_refuses_a_lost_channel_architecture(backend, tiny_model, tmp_path, monkeypatch, one_thread):
    tiny_model.eval()
    src = save_checkpoint(tiny_model, tmp_path / "best.pt")
    cfg = config_from_dict({"amount": 0.3, "structure": "channel", "bn_recalibration": {"images": 0}})
    pruned, _ = prune_stage(_ckpt(tiny_model), cfg, _ctx(backend))
    out = save_checkpoint(pruned, tmp_path / "best_pruned.pt")
    seen: dict = {}
    _stub_finetune(monkeypatch, _saved(tiny_model, tmp_path / "ft" / "best.pt"), seen)  # full width again
    with pytest.raises(PruneError, match=r"the fine-tuned model lost the pruned architecture \(channel counts differ\)"):
        finetune_stage(out, pruned, _entry(src), cfg, _ctx(backend))
    assert seen["keep_architecture"] is True and seen["masks"] is None  # channels: no zeros to hold


@pytest.mark.parametrize("min_images,maps,epochs,want,why", [
    (1, {"best.pt": 0.6, "last.pt": 0.4}, (1, 2), "best.pt", "higher fitness on the 2 val images"),
    (1, {"best.pt": 0.4, "last.pt": 0.6}, (1, 2), "last.pt", "higher fitness on the 2 val images"),
    (1, {"best.pt": 0.6, "last.pt": 0.4}, (2, 2), "last.pt", "best.pt is the last epoch"),
    (100, {"best.pt": 0.6, "last.pt": 0.4}, (1, 2), "last.pt", r"the val split has 2 images \(< 100\)"),
])
def test_keep_auto_compares_best_and_last_on_the_val_split(backend, tiny_data, tmp_path, monkeypatch, min_images,
                                                            maps, epochs, want, why):
    """``finetune.keep: auto``: the plugin's own validation of best.pt and last.pt on the fine-tune data's val split
    decides (YOLOv5's fitness), only on a split of at least ``AUTO_KEEP_MIN_IMAGES`` images; the record says why."""
    import re

    import yolo_prune_plugin.backend.evaluation as E
    import yolo_prune_plugin.options as O
    from yolo_prune_plugin.stages import choose_kept

    monkeypatch.setattr(O, "AUTO_KEEP_MIN_IMAGES", min_images)
    seen = []

    def evaluate_weights(f, settings, loader=None, backend=None):
        seen.append((Path(f).name, len(loader.dataset)))
        return E.Metrics(0.5, 0.5, maps[Path(f).name], maps[Path(f).name])

    monkeypatch.setattr(E, "evaluate_weights", evaluate_weights)
    w = tmp_path / "weights"
    w.mkdir()
    for f in ("best.pt", "last.pt"):
        (w / f).write_bytes(b"x")
    settings = E.make_settings(tiny_data, 64, 2, "cpu", workers=0, backend=backend)
    ctx = RunContext(backend, CPU, 64, settings=settings, opt={"data": str(tiny_data)})
    best_epoch, last_epoch = epochs
    path, rec = choose_kept(w / "last.pt", {"file": "last.pt", "rule": "last", "best_epoch": best_epoch,
                                            "last_epoch": last_epoch, "epoch": last_epoch}, ctx)
    assert path == w / want and rec["file"] == want and rec["rule"] == "auto" and re.search(why, rec["why"])
    assert rec["epoch"] == (best_epoch if want == "best.pt" else last_epoch)
    if "fitness" in why:
        assert seen == [("best.pt", 2), ("last.pt", 2)]
        assert rec["fitness"] == {k: pytest.approx(v) for k, v in maps.items()}
    else:
        assert seen == []
