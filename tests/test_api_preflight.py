"""Errors about the user's own input come first: paths before heavy imports, device and class count before any
work; SIGTERM cleans up like Ctrl-C; temporary files of killed runs are removed by the next run."""

from __future__ import annotations

import json
import os
import re
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from yolo_prune_plugin.cli import main
from yolo_prune_plugin.errors import ConfigError
from yolo_prune_plugin.tools.synthetic import TINY, make_dataset

from testkit import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synthetic"), **TINY.dataset_kwargs())


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


def _run_py(code: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**_env(), **(env or {})}, timeout=timeout, cwd=str(ROOT))


# -- 5: paths before heavy imports ----------------------------------------------------------------------
PATH_CASES = [
    (["prune", "--weights", "{tmp}/nope.pt", "--amount", "0.3"], r"nope.pt: no such file \(--weights"),
    (["prune", "--weights", "{ck}", "--data", "{tmp}/nodata.yaml"], r"--data .*nodata.yaml: data YAML not found"),
    (["prune", "--weights", "{ck}", "--config", "{tmp}/nocfg.yaml"], r"--config .*nocfg.yaml: prune config YAML not found"),
    (["sweep", "--weights", "{tmp}/nope.pt", "--data", "{tmp}/nodata.yaml"], r"nope.pt: no such file"),
    (["export", "--weights", "{tmp}", "--include", "onnx"], r"is a directory"),
    (["train", "--weights", "{tmp}/nope.pt", "--data", "{ck}", "--prune-amount", "0.3"], r"nope.pt: no such file"),
    (["train", "--weights", "{ck}", "--data", "{tmp}/nodata.yaml", "--prune-amount", "0.3"],
     r"nodata.yaml: data YAML not found"),
]


@pytest.fixture(scope="module")
def path_errors(tmp_path_factory):
    """Every case in one fresh interpreter (each command returns before YOLOv5 would be imported, so one
    process shows it for all): ``[(rc, stderr), ...]`` and the YOLOv5 modules imported by the end."""
    tmp = tmp_path_factory.mktemp("paths")
    ck = tmp / "exists.pt"
    ck.write_bytes(b"x")
    cases = [[a.format(tmp=tmp, ck=ck) for a in args] for args, _ in PATH_CASES]
    r = _run_py(f"""
        import contextlib, io, json, sys
        from yolo_prune_plugin.cli import main
        out = []
        for args in {cases!r}:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = main(args)
            out.append((rc, err.getvalue()))
        heavy = sorted(m for m in ("yolov5", "models", "utils", "train", "val") if m in sys.modules)
        print("RESULT " + json.dumps({{"cases": out, "heavy": heavy}}))
    """, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.split("RESULT ", 1)[1])


@pytest.mark.parametrize("i", range(len(PATH_CASES)))
def test_path_errors_fire_before_yolov5_is_imported(path_errors, i):
    rc, err = path_errors["cases"][i]
    assert rc in (1, 2), err
    assert re.search(PATH_CASES[i][1], err), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert path_errors["heavy"] == []  # the errors came before YOLOv5 (~10 s of imports) was imported


# -- 2: device not on this machine ------------------------------------------------------------------------
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@needs_no_cuda
@pytest.mark.parametrize("cmd", ["prune", "sweep", "train", "export"])
def test_cuda_device_without_cuda_is_one_line_exit_2(small_ckpt, tiny_data, tmp_path, capsys, cmd):
    args = {"prune": ["prune", "--weights", str(small_ckpt), "--data", str(tiny_data), "--amount", "0.3"],
            "sweep": ["sweep", "--weights", str(small_ckpt), "--data", str(tiny_data), "--out", str(tmp_path / "sw")],
            "export": ["export", "--weights", str(small_ckpt), "--include", "onnx"],
            "train": ["train", "--data", str(tiny_data), "--weights", str(small_ckpt), "--img", "64", "--epochs", "1",
                      "--project", str(tmp_path / "runs"), "--prune-amount", "0.3"]}[cmd]
    rc = main([*args, "--device", "0"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert re.fullmatch(r"yolo-prune: error: --device 0: CUDA is not available on this machine \(.*\); "
                        r"available: cpu.*\n", err), err
    # no work done: nothing written beside the weights, no run folder, no sweep folder
    assert sorted(p.name for p in small_ckpt.parent.iterdir()) == sorted(
        ["best.pt"] + [p.name for p in tmp_path.iterdir() if p != small_ckpt])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sw").exists()
    assert not small_ckpt.with_name("best_pruned.pt").exists()


@needs_no_cuda
@pytest.mark.parametrize("device,match", [("0", "CUDA is not available"), ("0,1", "CUDA is not available"),
                                          ("cuda:0", "CUDA is not available"), ("gpu", "expected cpu, mps or CUDA"),
                                          ("mps", "MPS is not available")])
def test_api_prune_checks_device_first(small_ckpt, device, match):
    from yolo_prune_plugin.api import prune

    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(ConfigError, match=match):
        prune(small_ckpt, None, amount=0.3, device=device)
    assert not small_ckpt.with_name("best_pruned.pt").exists()


@needs_no_cuda
@pytest.mark.parametrize("device", ["", "cpu", "CPU", " cpu"])
def test_cpu_and_auto_devices_pass(small_ckpt, device):
    """Accepted by the early check, and then really used: the file is pruned on the CPU."""
    from yolo_prune_plugin.api import prune
    from yolo_prune_plugin.backend.checks import check_device

    check_device(device)
    [entry] = prune(small_ckpt, None, amount=0.3, device=device)
    assert entry.device == "cpu" and small_ckpt.with_name("best_pruned.pt").is_file()


# -- 3: model classes vs data YAML ------------------------------------------------------------------------
@pytest.fixture
def nc5_ckpt(backend, tmp_path):
    model = backend.yolo.Model(str(backend.root / "models" / "yolov5n.yaml"), ch=3, nc=5)
    model.nc, model.names = 5, {i: f"c{i}" for i in range(5)}
    return save_checkpoint(model, tmp_path / "nc5.pt")


@pytest.mark.parametrize("cmd", ["prune", "sweep"])
def test_nc_mismatch_is_one_line_exit_2_before_work(nc5_ckpt, tiny_data, tmp_path, capsys, cmd):
    extra = ["--amount", "0.3"] if cmd == "prune" else ["--out", str(tmp_path / "sw")]
    rc = main([cmd, "--weights", str(nc5_ckpt), "--data", str(tiny_data), "--device", "cpu", "--img", "64",
               "--workers", "0", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert re.search(r"nc5.pt: the model has 5 classes \(c0, c1, c2, c3, \.\.\.\) but .*data.yaml has nc=3 "
                     r"\(circle, rectangle, triangle\)", err), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not nc5_ckpt.with_name("nc5_pruned.pt").exists() and not (tmp_path / "sw").exists()


def test_class_name_mismatch_warns_and_single_cls_passes(small_model, tiny_data, tmp_path, caplog, backend):
    from yolo_prune_plugin.backend.loading import load_checkpoint
    from yolo_prune_plugin.backend.checks import check_model_matches_data
    from yolo_prune_plugin.backend.evaluation import resolve_data

    data = resolve_data(tiny_data)
    small_model.names = {0: "circle", 1: "triangle", 2: "rectangle"}
    ck = save_checkpoint(small_model, tmp_path / "swapped.pt")
    model = load_checkpoint(ck)["model"]
    check_model_matches_data(model, data, ck, tiny_data)
    assert re.search(r"swapped.pt: class names differ from .*data.yaml \(class 1: model 'triangle', data "
                     r"'rectangle'\)", caplog.text)
    model.nc = 5
    with pytest.raises(ConfigError, match="the model has 5 classes"):
        check_model_matches_data(model, data, ck, tiny_data)
    check_model_matches_data(model, data, ck, tiny_data, single_cls=True)


def test_matching_classes_pass(small_model, tiny_data, tmp_path, backend, caplog):
    from yolo_prune_plugin.backend.loading import load_checkpoint
    from yolo_prune_plugin.backend.checks import check_model_matches_data
    from yolo_prune_plugin.backend.evaluation import resolve_data

    small_model.names = {0: "circle", 1: "rectangle", 2: "triangle"}
    ck = save_checkpoint(small_model, tmp_path / "ok.pt")
    check_model_matches_data(load_checkpoint(ck)["model"], resolve_data(tiny_data), ck, tiny_data)
    assert "differ" not in caplog.text


# -- 4: SIGTERM during evaluation; stale temp files ----------------------------------------------------------
_SLOW_EVAL = """
    import sys, time
    from yolo_prune_plugin.backend.loading import get_backend
    b = get_backend()
    orig = b.val.run
    calls = []
    def slow_run(*a, **k):  # YOLOv5's real validator; the after-pruning one (2nd) made slow for the signal
        calls.append(1)
        if len(calls) == 2:
            print("EVAL-STARTED", flush=True)
            time.sleep(60)
        return orig(*a, **k)
    b.val.run = slow_run
    from yolo_prune_plugin.cli import main
    sys.exit(main({args!r}))
"""


def _start_prune_and_wait_for_eval(weights: Path, data: Path) -> tuple[subprocess.Popen, Path]:
    """A `yolo-prune prune` process stopped inside its second evaluation; its stderr goes to a file (a pipe nobody
    reads can fill and block it), its stdout is drained by a thread, and the wait has a deadline of its own."""
    args = ["prune", "--weights", str(weights), "--data", str(data), "--amount", "0.3", "--device", "cpu",
            "--img", "64", "--workers", "0", "--method", "global"]  # no calibration: the signal is what is tested
    log = weights.with_name("prune.stderr.log")
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_SLOW_EVAL.format(args=args))], env=_env(),
                             cwd=str(ROOT), stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue = queue.Queue()

    def drain() -> None:
        for line in p.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + 240
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            p.kill()
            pytest.fail(f"evaluation did not start within 240 s: {log.read_text()[-2000:]}")
        if line is None:
            pytest.fail(f"evaluation never started (exit {p.wait()}): {log.read_text()[-2000:]}")
        if "EVAL-STARTED" in line:
            return p, log


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name == "best_pruned.pt")


def test_sigterm_during_evaluation_leaves_no_file(small_ckpt, tiny_data):
    p, log = _start_prune_and_wait_for_eval(small_ckpt, tiny_data)
    assert any(n.startswith(".best_pruned.pt.") for n in _leftovers(small_ckpt.parent))  # mid-write temp exists
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    err = log.read_text()
    assert p.returncode == 143, err
    assert "terminated (SIGTERM)" in err
    assert _leftovers(small_ckpt.parent) == []


def test_temp_file_of_killed_run_is_removed_by_next_run(small_ckpt, caplog):
    """A run killed with SIGKILL mid-write leaves its temporary (test_sigterm_during_evaluation_leaves_no_file shows
    one exists mid-write; nothing can remove it at SIGKILL): the next run writing the same file removes it, and leaves
    a live process's temporary alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)  # a pid whose process is gone, as a killed run's
    stale = [f".best_pruned.pt.yp{dead.pid}-k1ll3d.tmp"]
    (small_ckpt.parent / stale[0]).write_bytes(b"half a checkpoint")
    assert _leftovers(small_ckpt.parent) == stale
    # a temp file of a live process (this one) for the same destination is not touched
    live = small_ckpt.parent / f".best_pruned.pt.yp{os.getpid()}-abc.tmp"
    live.write_bytes(b"in progress")
    assert main(["prune", "--weights", str(small_ckpt), "--amount", "0.3", "--device", "cpu"]) == 0
    assert _leftovers(small_ckpt.parent) == sorted(["best_pruned.pt", live.name])
    assert f"removed {small_ckpt.parent / stale[0]}" in caplog.text


# -- 6: quiet log (a driven training's log: tests/e2e/test_train.py::test_train_flag_prunes_best_and_last_with_a_quiet_log)
def test_quiet_yolov5_restores_filters():
    import logging
    import warnings

    from yolo_prune_plugin.backend.patches import quiet_yolov5

    before = list(warnings.filters)
    yl = logging.getLogger("yolov5")
    n = len(yl.filters)
    with quiet_yolov5():
        with quiet_yolov5():  # nested: one shared entry
            with warnings.catch_warnings(record=True) as w:
                assert warnings.filters[0][1].pattern.startswith("`torch")  # ours first, then: show all others
                warnings.filters.insert(1, ("always", None, Warning, None, 0))
                warnings._filters_mutated()
                torch.cuda.amp.GradScaler(enabled=False)
                warnings.warn("other", FutureWarning)
            assert [str(x.message) for x in w] == ["other"]
        assert len(warnings.filters) == len(before) + 1 and len(yl.filters) == n + 1
    assert warnings.filters == before and len(yl.filters) == n
