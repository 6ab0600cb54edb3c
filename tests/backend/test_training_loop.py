"""training_loop.py: YOLOv5 train options (never from the host's argv), what is read from and set in a running
``train()`` frame (stand-in ``train`` functions here: no real training), the gradient hook and the checkpoint
architecture factory. ``replace_optimizer_params`` is tested in tests/training/test_channel_schedule.py."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn

from yolo_prune_plugin.backend import training_loop as TL
from yolo_prune_plugin.backend.training_loop import (TrainingObjects, add_gradient_hook, is_channel_pruned,
                                                     keep_checkpoint_architecture, running_train_opt,
                                                     steady_training_loop, train_opt, training_objects)
from yolo_prune_plugin.errors import ConfigError, PruneError

HOST_ARGV = ["host_script.py", "-h", "--epochs", "99", "--not-a-yolov5-flag"]


# -- train_opt -----------------------------------------------------------------------------------------------
def test_train_opt_parses_args_and_kwargs_never_the_host_argv(backend, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(HOST_ARGV))
    saved = sys.argv
    seen = []
    real = backend.train.parse_opt

    def spy(known=False):
        seen.append((list(sys.argv), known))
        return real(known)

    monkeypatch.setattr(backend.train, "parse_opt", spy)
    opt = train_opt(["--epochs", "7", "--img", "96"], backend, batch_size=5, noplots=True)
    assert seen == [(["train.py", "--epochs", "7", "--img", "96"], False)]  # only the args, parsed strictly
    assert (opt.epochs, opt.imgsz, opt.batch_size, opt.noplots) == (7, 96, 5, True)
    assert sys.argv is saved and sys.argv == HOST_ARGV  # restored, untouched
    default = train_opt(backend=backend)  # the host's "-h" / "--epochs 99" never reach YOLOv5's parser
    assert default.epochs == 100 and seen[-1] == (["train.py"], False)
    assert sys.argv == HOST_ARGV


def test_train_opt_unknown_flag_is_strict_and_argv_is_restored(backend, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", list(HOST_ARGV))
    with pytest.raises(SystemExit) as e:
        train_opt(["--epochs", "2", "--no-such-flag"], backend)
    assert e.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    assert sys.argv == HOST_ARGV


@pytest.mark.parametrize("key", ["foo", "batch", "img_size"])
def test_train_opt_unknown_kwarg_is_config_error_naming_it(backend, key):
    with pytest.raises(ConfigError, match=rf"^train: unknown YOLOv5 train option '{key}'$"):
        train_opt([], backend, epochs=3, **{key: 1})


# -- reading the running train() ----------------------------------------------------------------------------
def test_nothing_is_read_outside_a_train_frame(backend):
    assert running_train_opt() is None
    with pytest.raises(PruneError, match=r"could not find YOLOv5's train\(\) objects .*YOLOv5 7\.0\.x's train\.py"):
        training_objects(backend)
    with pytest.raises(PruneError, match=r"could not find YOLOv5's train\(\) objects"):
        steady_training_loop()


def test_a_train_function_without_yolov5_locals_is_not_yolov5s():
    def train():  # e.g. the plugin's own api.train on the stack: no opt/hyp/optimizer/ema locals
        something = 1
        return running_train_opt(), something

    assert train() == (None, 1)


def _callback(fn):
    """Called the way YOLOv5's Callbacks.run calls hooks: a few frames below train()."""
    return fn()


def test_running_train_opt_from_a_callback_inside_train():
    def train(hyp, opt, device, callbacks):
        return callbacks(running_train_opt)

    opt = object()
    assert train({"lr0": 0.01}, opt, "cpu", _callback) is opt


@pytest.fixture
def parts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    groups = [{"params": [model[0].bias, model[1].bias], "weight_decay": 0.0},
              {"params": [model[0].weight], "weight_decay": 5e-4},
              {"params": [model[1].weight], "weight_decay": 0.0}]
    return model, torch.optim.SGD(groups, lr=0.01, momentum=0.9)


@pytest.mark.parametrize("start_epoch,resume,resumed", [(0, False, False), (3, False, True), (0, True, True)])
def test_training_objects_from_train_locals(backend, parts, start_epoch, resume, resumed):
    model, optimizer = parts
    ema = object()

    def train(model, optimizer, ema, start_epoch, resume, imgsz):  # YOLOv5 train()'s local names
        return _callback(lambda: training_objects(backend))

    o = train(nn.DataParallel(model), optimizer, ema, start_epoch, resume, 64)
    assert isinstance(o, TrainingObjects)
    assert o.model is model and o.optimizer is optimizer and o.ema is ema  # the DDP-style wrapper unwrapped
    assert (o.start_epoch, o.resumed, o.imgsz) == (start_epoch, resumed, 64)


def test_training_objects_defaults_and_non_int_imgsz(backend, parts):
    model, optimizer = parts

    def train(model, optimizer, ema, imgsz):  # no start_epoch/resume locals
        return _callback(lambda: training_objects(backend))

    o = train(model, optimizer, None, [64, 64])
    assert o.imgsz is None and o.start_epoch == 0 and not o.resumed and o.ema is None and o.model is model


def test_steady_training_loop_sets_train_locals_and_scales_decay(parts):
    """nw -> -1 (no warm-up) and accumulate -> 1 written into the suspended train() frame; the decay of every group
    divided by the accumulate it replaces (groups without decay stay 0)."""
    _, optimizer = parts

    def train(optimizer, ema):
        nw, accumulate = 100, 4
        done = _callback(steady_training_loop)
        return done, {"nw": nw, "accumulate": accumulate}  # what train() reads next

    done, after = train(optimizer, None)
    assert done == {"warmup_iterations": 0, "accumulate": 1, "yolov5_warmup_iterations": 100, "yolov5_accumulate": 4}
    assert after == {"nw": -1, "accumulate": 1}  # the frame's own variables changed
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, pytest.approx(5e-4 / 4), 0.0]


def test_set_train_locals_refuses_a_write_that_did_not_take(monkeypatch):
    class Frame:  # f_locals is a fresh snapshot each time: nothing written through
        @property
        def f_locals(self):
            return {"nw": 100}

    monkeypatch.setattr(TL.ctypes.pythonapi, "PyFrame_LocalsToFast", lambda *a: None, raising=False)  # not a frame
    with pytest.raises(PruneError, match=r"could not set nw in YOLOv5's train\(\); set finetune.warmup: true"):
        TL._set_train_locals(Frame(), nw=-1)


# -- gradient hook -----------------------------------------------------------------------------------------
def test_gradient_hook_runs_before_every_step_and_is_removable():
    w = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=1.0)
    calls = []

    def add():
        calls.append(w.grad.clone())
        w.grad += torch.tensor([1.0, 0.0, -1.0])

    handle = add_gradient_hook(opt, add)
    for _ in range(2):
        opt.zero_grad()
        (w * torch.tensor([0.5, 0.5, 0.5])).sum().backward()
        opt.step()
    assert len(calls) == 2 and torch.equal(calls[0], torch.full((3,), 0.5))  # after backward, before the step
    assert torch.equal(w.detach(), torch.tensor([-3.0, -1.0, 1.0]))  # two steps of (0.5 + added) each
    handle.remove()
    opt.zero_grad()
    w.sum().backward()
    opt.step()
    assert len(calls) == 2 and torch.equal(w.detach(), torch.tensor([-4.0, -2.0, 0.0]))


# -- channel-pruned architectures -----------------------------------------------------------------------------
def test_model_without_yaml_is_not_channel_pruned():
    """(Models with a YAML, pruned or not: tests/prune/test_channel.py.)"""
    assert is_channel_pruned(nn.Sequential(nn.Conv2d(3, 4, 1))) is False


def test_keep_architecture_factory_copies_the_checkpoint_and_refuses_what_it_cannot_keep(backend, small_ckpt, caplog):
    orig = backend.train.Model
    with caplog.at_level("INFO", logger="yolo_prune_plugin"):
        with keep_checkpoint_architecture(backend, small_ckpt) as src:
            m = backend.train.Model("ignored.yaml", ch=3, nc=3)
            assert m is not src and next(m.parameters()).dtype == torch.float32
            assert next(src.parameters()).dtype == torch.float16  # the checkpoint's own module is left as loaded
            assert all(p.requires_grad for p in m.parameters())
            assert [p.shape for p in m.parameters()] == [p.shape for p in src.parameters()]
            with pytest.raises(PruneError, match=r"best\.pt: channel-pruned checkpoint keeps its anchors"):
                backend.train.Model(None, ch=3, nc=3, anchors=[[10, 13, 16, 30, 33, 23]])
            with pytest.raises(PruneError, match=r"best\.pt: channel-pruned checkpoint takes 3 input channels, not 1"):
                backend.train.Model(None, ch=1, nc=3)
            with pytest.raises(PruneError, match=r"best\.pt: channel-pruned checkpoint has 3 classes but the dataset 5"):
                backend.train.Model(None, ch=3, nc=5)
    assert backend.train.Model is orig
    assert "training the channel-pruned architecture of best.pt" in caplog.text
