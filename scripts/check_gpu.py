#!/usr/bin/env python
"""Run every CUDA code path of the plugin once on one GPU (about 6 min on an H200) and print one line per path.

    python scripts/check_gpu.py [--shared ../shared] [--device 0] [--img 320] [--logs DIR]

Paths: prune (global, obs) on CUDA with half-precision evaluation as YOLOv5's final validation does it (and
YOLOv5's own ``val.py --half`` on the written file reproduces the numbers); a 1-epoch ``yolo-prune train
--device 0 --prune-amount 0.3`` on coco128 with its report; ``yolo-prune prune --structure channel
--finetune-epochs 1 --finetune-distill`` (teacher in fp16); ``torch.distributed.run --nproc_per_node 1`` through
``yolo-prune train`` with a schedule and with a channel prune + fine-tune at train end (YOLOv5's DDP mode, the plugin's
rank logic, the fine-tune as one process on rank 0); channel variants (sensitivity, L1 cost-aware, a budget search),
``channel.regularize`` and a channel schedule in ``yolo-prune train``; a half ONNX export with verification;
``yolo-prune bench`` on the GPU when that command exists. Each path runs as its own ``yolo-prune`` process.
Exit status 1 if any path failed; without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LOGS: list[Path] = []  # --logs: every subprocess's full output is written there


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    if LOGS:
        LOGS[0].mkdir(parents=True, exist_ok=True)
        with open(LOGS[0] / "check_gpu_subprocesses.log", "a") as f:
            f.write(f"\n===== {' '.join(cmd)}\n===== exit {r.returncode}\n{r.stdout}\n{r.stderr}\n")
    return r


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "yolo_prune_plugin.cli", *args], timeout)


def _why(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (r.stderr + r.stdout).strip().splitlines() if ln.strip()]
    return f"exit {r.returncode}: {lines[-1][:300] if lines else 'no output'}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=os.environ.get("YOLO_PRUNE_SHARED", str(ROOT.parent / "shared")))
    ap.add_argument("--device", default="0")
    ap.add_argument("--img", type=int, default=320)
    ap.add_argument("--logs", default=None, help="folder to write every subprocess's full output into")
    a = ap.parse_args(argv)
    if a.logs:
        LOGS.append(Path(a.logs))

    import torch

    if not torch.cuda.is_available():
        print(f"check_gpu: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); nothing to "
              "check here")
        return 0
    shared = Path(a.shared).expanduser().resolve()
    weights, data_yaml = shared / "weights" / "yolov5n.pt", shared / "data" / "coco128.yaml"
    if not weights.is_file() or not data_yaml.is_file():
        print(f"check_gpu: failed: needs {weights} and {data_yaml} (pass --shared)")
        return 1
    from yolo_prune_plugin.tools.heldout import split_data_yaml

    work = Path(tempfile.mkdtemp(prefix="yolo_prune_gpu_"))
    # coco128's train and val are the same images, and the data-aware paths (obs, sensitivity, Taylor,
    # reconstruction) refuse that: calibrate/train on the first 64, validate on the other 64
    data = split_data_yaml(data_yaml, work / "data", calibration=64, evaluation=64, split="train")
    dev, img = a.device, str(a.img)
    print(f"check_gpu: {torch.cuda.get_device_name(int(dev.split(',')[0]))}, torch {torch.__version__}, work {work}")
    results: list[tuple[str, bool, str]] = []

    def path(name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            msg = fn()
            ok = True
        except Exception as e:  # noqa: BLE001 - every path reports, none stops the others
            ok, msg = False, f"{type(e).__name__}: {e}"
        line = f"{name:<28} {'ok' if ok else 'FAILED'}  ({time.perf_counter() - t0:5.1f}s)  {msg}"
        print(line, flush=True)
        results.append((name, ok, msg))

    def prune(method: str, *extra: str, name: str = "", amount: str | None = "0.3", timeout: float = 240) -> dict:
        d = work / f"prune_{name or method}"
        d.mkdir()
        w = d / "yolov5n.pt"
        shutil.copy(weights, w)
        r = _cli("prune", "--weights", str(w), "--data", str(data), "--img", img, "--device", dev, "--method",
                 method, "--workers", "4", *(("--amount", amount) if amount else ()), *extra, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(_why(r))
        entry = json.loads((d / "prune_report.json").read_text())["results"][0]
        if not str(entry["device"]).startswith("cuda"):
            raise RuntimeError(f"pruned on {entry['device']}, not CUDA")
        if not entry.get("eval", {}).get("half"):
            raise RuntimeError("evaluation was not half precision (YOLOv5's final validation on GPU is)")
        return entry

    def prune_global() -> str:
        e = prune("global")
        return f"mAP50-95 {e['metrics_before']['mAP50-95']:.4f} -> {e['metrics_after']['mAP50-95']:.4f}"

    def prune_obs() -> str:
        e = prune("obs")
        return f"mAP50-95 {e['metrics_after']['mAP50-95']:.4f}, {e['prune_seconds']:.1f}s"

    def config_file(name: str, config: str) -> str:
        cfg = work / f"{name}.yaml"
        cfg.write_text(config + "\n")
        return str(cfg)

    def channel(name: str, config: str, amount: str | None = "0.3") -> Callable[[], str]:
        """``yolo-prune prune --structure channel`` with one config variant (each runs other CUDA code)."""
        def run() -> str:
            e = prune("global", "--structure", "channel", "--config", config_file(name, config), name=name,
                      amount=amount)
            return (f"mAP50-95 {e['metrics_after']['mAP50-95']:.4f}, params "
                    f"{(e.get('channels') or {}).get('params_after')}, {e['prune_seconds']:.1f}s")
        return run

    def half_eval_matches_val() -> str:
        from yolo_prune_plugin.backend.loading import get_backend
        from yolo_prune_plugin.backend.patches import driving_yolov5

        b = get_backend()
        out = work / "prune_global" / "yolov5n_pruned.pt"
        entry = json.loads((work / "prune_global" / "prune_report.json").read_text())["results"][0]
        with driving_yolov5(b):  # offline: YOLOv5's val would try to download Arial.ttf
            r = b.val.run(data=str(data), weights=str(out), imgsz=int(img), batch_size=32, iou_thres=0.6,
                          device=dev, half=True, workers=4, project=str(work / "val"), plots=False)[0]
        d = abs(r[3] - entry["metrics_after"]["mAP50-95"])
        if d > 0.002:
            raise RuntimeError(f"YOLOv5 val.py --half gives {r[3]:.4f}, report says "
                               f"{entry['metrics_after']['mAP50-95']:.4f}")
        return f"val.py --half {r[3]:.4f} (|diff| {d:.4f})"

    def train() -> str:
        r = _cli("train", "--data", str(data), "--weights", str(weights), "--img", img, "--epochs", "1",
                 "--batch-size", "16", "--device", dev, "--workers", "4", "--project", str(work / "runs"),
                 "--name", "exp", "--prune-amount", "0.3", timeout=300)
        if r.returncode != 0:
            raise RuntimeError(_why(r))
        rep = work / "runs" / "exp" / "prune_report.json"
        entry = json.loads(rep.read_text())["results"][0]
        return f"sparsity {entry['sparsity_after']['sparsity']:.3f}, report {rep}"

    def finetune_distill() -> str:
        ft = prune("global", "--structure", "channel", "--finetune-epochs", "1", "--finetune-distill",
                   "--batch-size", "16", name="finetune", timeout=400)["finetune"]
        if ft["distill"]["teacher_dtype"] != "torch.float16":
            raise RuntimeError(f"teacher ran as {ft['distill']['teacher_dtype']}, not fp16 on CUDA")
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
        return (f"teacher {ft['distill']['teacher_mb']:.1f} MB fp16, loss_teacher "
                f"{ft['history'][0].get('loss_teacher')}, {ft['history'][0]['epoch_s']} s/epoch (this process peak "
                f"{peak:.0f} MB)")

    def train_report(name: str, config: str, epochs: str, ddp: bool = False) -> dict:
        """``yolo-prune train --prune-config`` (under ``torch.distributed.run --nproc_per_node 1``: YOLOv5's DDP
        mode, when ``ddp``); its prune_report.json."""
        launch = ("torch.distributed.run", "--nproc_per_node", "1", "-m") if ddp else ()
        r = _run([sys.executable, "-m", *launch, "yolo_prune_plugin.cli", "train", "--data", str(data), "--weights",
                  str(weights), "--img", img, "--epochs", epochs, "--batch-size", "16", "--device", dev, "--workers",
                  "4", "--project", str(work / "runs"), "--name", name, "--prune-config", config_file(name, config)],
                 400)
        if r.returncode != 0:
            raise RuntimeError(_why(r))
        return json.loads((work / "runs" / name / "prune_report.json").read_text())

    def train_channel(name: str, config: str, epochs: str = "2") -> Callable[[], str]:
        """``yolo-prune train --prune-structure channel`` with a training-time option (regularise, schedule)."""
        def run() -> str:
            rep = train_report(name, config, epochs)
            e = rep["results"][0]
            hist = [h for h in rep.get("history") or [] if isinstance(h, dict)]
            return (f"mAP50-95 {(e.get('metrics_after') or {}).get('mAP50-95')}, params "
                    f"{(e.get('channels') or {}).get('params_after')}, history keys "
                    f"{sorted({k for h in hist for k in h})[:8]}")
        return run

    def torchrun(name: str, config: str, epochs: str) -> Callable[[], str]:
        """The real DDP path with one process: torch.distributed.run -> yolo-prune train (YOLOv5's DDP mode)."""
        def run() -> str:
            e = train_report(name, config, epochs, ddp=True)["results"][0]
            return (f"{e['mode']}: sparsity {e['sparsity_after']['sparsity']:.3f}, mAP50-95 "
                    f"{(e.get('metrics_after') or {}).get('mAP50-95')}, leaks {e.get('leaks')}")
        return run

    def export_half() -> str:
        src = work / "prune_global" / "yolov5n_pruned.pt"
        r = _cli("export", "--weights", str(src), "--include", "onnx", "--device", dev, "--half", "--img", img)
        if r.returncode != 0:
            raise RuntimeError(_why(r))
        return (r.stdout.strip().splitlines() or [""])[-1][:200]

    def bench() -> str:
        h = _cli("--help")
        if " bench" not in h.stdout and "bench," not in h.stdout and ",bench" not in h.stdout:
            return "skipped: this version has no `yolo-prune bench` command"
        r = _cli("bench", "--weights", str(work / "prune_global" / "yolov5n_pruned.pt"), "--device", dev,
                 "--img", img)
        if r.returncode != 0:
            raise RuntimeError(_why(r))
        return (r.stdout.strip().splitlines() or [""])[-1][:200]

    path("prune global (cuda)", prune_global)
    path("half eval = YOLOv5 val --half", half_eval_matches_val)
    path("export onnx --half", export_half)
    path("channel default (cuda)", channel("ch_default", "evaluate: true"))
    path("finetune + distill (cuda)", finetune_distill)
    path("torchrun 1 GPU schedule", torchrun("ddp", "schedule: {final_amount: 0.3, start_epoch: 0, end_epoch: 1}",
                                             "2"))
    path("torchrun 1 GPU + finetune", torchrun("ddp_ft", "structure: channel\nfinetune: {epochs: 1}", "1"))
    path("train channel regularize", train_channel("regularize", "structure: channel\n"
                                                   "channel: {regularize: {weight: 0.0001, from_epoch: 0}}"))
    path("channel sensitivity+comp", channel("ch_sens", "channel: {allocation: sensitivity, compensate: true}"))
    path("prune obs (cuda)", prune_obs)
    path("train 1 epoch + prune", train)
    path("train channel schedule", train_channel("ch_schedule", "structure: channel\n"
                                                 "schedule: {final_amount: 0.3, start_epoch: 0, end_epoch: 1}"))
    path("channel l1 cost-aware bnrecal", channel("ch_l1", "channel: {importance: l1, cost_aware: 0.1, reconstruct: "
                                                          "false}\nbn_recalibration: {images: 16}"))
    path("budget search (cuda)", channel("ch_target", "target: {max_size: 0.8, max_evals: 3}", None))
    path("bench (gpu)", bench)
    failed = [n for n, ok, _ in results if not ok]
    print(f"check_gpu: {len(results) - len(failed)} ok, {len(failed)} failed" + (f": {', '.join(failed)}" if failed
                                                                                    else ""))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
