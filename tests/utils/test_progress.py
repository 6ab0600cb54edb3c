"""Progress bars (YOLOv5's tqdm style) for obs calibration, sweeps and export verification, on a terminal only."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def tty(monkeypatch, capsys):
    """Bars on (as on a terminal); their text read back from stderr."""
    monkeypatch.setenv("YOLO_PRUNE_PROGRESS", "1")

    class Err:
        def getvalue(self) -> str:
            return capsys.readouterr().err

    return Err()


def test_obs_shows_a_bar_per_layer(backend, small_model, tty, one_thread):
    from yolo_prune_plugin.prune.obs import obs_prune
    from yolo_prune_plugin.prune.unstructured import conv_layers

    layers = conv_layers(small_model)
    torch.manual_seed(0)
    obs_prune(small_model.float(), layers, 0.3, torch.rand(2, 3, 64, 64))
    out = tty.getvalue()
    assert "obs: pruning layers" in out and f"0/{len(layers)}" in out
    assert "%|" in out  # YOLOv5's TQDM_BAR_FORMAT: '{l_bar}{bar:10}{r_bar}'


def test_export_verification_shows_a_bar(backend, small_ckpt, tty):
    from yolo_prune_plugin.backend.export import export_and_verify

    arts = export_and_verify(small_ckpt, ["torchscript"], imgsz=64)
    err = tty.getvalue()
    assert arts[0].ok and "verify exports" in err and "1/1" in err


def test_no_bar_when_not_a_terminal(capsys):
    from yolo_prune_plugin.utils.progress import progress

    assert list(progress(range(3), desc="quiet", total=3)) == [0, 1, 2]
    assert "quiet" not in capsys.readouterr().err


@pytest.mark.parametrize("env,shown", [(None, False), ("0", False), ("1", True)])
def test_cli_bench_bar_only_on_a_terminal(small_ckpt, capfd, monkeypatch, env, shown):
    """``yolo-prune bench`` into a pipe or log file: no carriage-return bar lines unless forced on."""
    from yolo_prune_plugin.cli import main

    if env is None:
        monkeypatch.delenv("YOLO_PRUNE_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("YOLO_PRUNE_PROGRESS", env)
    assert main(["bench", "--weights", str(small_ckpt), "--img", "64", "--runs", "3", "--warmup", "0",
                 "--threads", "1", "--backends", "torch"]) == 0
    out, err = capfd.readouterr()
    assert "torch med ms" in out
    assert ("bench" in err and "0/3" in err) is shown, err
    assert ("\r" in out + err) is shown, err
