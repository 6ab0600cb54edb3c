"""``yolo-prune``: train with pruning, prune or export an existing checkpoint, sweep, demo."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ._version import __version__
from .config import METHOD_CHOICES, PruneConfig, check_finetune_value, config_from_dict, load_config
from .errors import ConfigError, PruneError

LOGGER = logging.getLogger("yolo_prune_plugin")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (it may be redirected)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _setup_logging(verbose: bool = False) -> tuple[Optional[logging.Handler], int]:
    """Log to stderr for this command; returns the handler added (None if one was there) and the level before,
    both put back when the command ends."""
    level = LOGGER.level
    LOGGER.setLevel(logging.DEBUG if verbose else logging.INFO)
    if any(isinstance(h, _StderrHandler) for h in LOGGER.handlers):
        return None, level
    h = _StderrHandler()
    h.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(h)
    return h, level


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--yolov5-dir", default=None, metavar="DIR",
                   help="use an upstream ultralytics/yolov5 checkout instead of the PyPI package")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load checkpoints without the class allow-list (ONLY for files you trust)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _prune_options(p: argparse.ArgumentParser, prefix: str) -> None:
    """Flags that override the YAML config (``--prune-amount`` on train, ``--amount`` on prune)."""
    p.add_argument(f"--{prefix}config", metavar="FILE", help="prune YAML config (default: built-in defaults)")
    p.add_argument(f"--{prefix}amount", type=float, metavar="A", help="target fraction of Conv2d weights set to zero")
    p.add_argument(f"--{prefix}method", metavar="M", help=f"importance method: {', '.join(METHOD_CHOICES)} (auto: obs when the data has a train split "
                   "disjoint from val, else global)")
    p.add_argument(f"--{prefix}structure", metavar="S", help="unstructured (zeros, default) or channel (removes "
                   "whole channels: a smaller, faster model)")
    p.add_argument(f"--{prefix}bench", action="store_true", default=None,
                   help="time the original and the pruned model (PyTorch eager, ONNX Runtime CPU) into the report")
    p.add_argument(f"--{prefix}include", metavar="PATTERNS", help="comma-separated module-name patterns to prune")
    p.add_argument(f"--{prefix}exclude", metavar="PATTERNS", help="comma-separated module-name patterns to skip")
    p.add_argument(f"--{prefix}checkpoints", metavar="NAMES", help="best,last (train only; default best)")
    p.add_argument(f"--{prefix}suffix", metavar="S", help="output name suffix (default _pruned)")
    p.add_argument(f"--{prefix}export", metavar="FORMATS", help="export formats for the pruned model, e.g. onnx,torchscript")
    p.add_argument(f"--{prefix}overwrite", action="store_true", default=None,
                   help="replace an existing pruned file written with a different configuration")
    p.add_argument(f"--{prefix}no-eval", dest=f"{prefix.replace('-', '_')}evaluate", action="store_false",
                   default=None, help="skip validation after pruning")
    p.add_argument(f"--{prefix}finetune-epochs", type=int, metavar="N",
                   help="fine-tune epochs after pruning, in YOLOv5's own training loop on the data's train split")
    p.add_argument(f"--{prefix}finetune-recipe", metavar="R", help="recovery recipe: plain (prune, then fine-tune) or "
                   "regularize (train the planned channels to zero first, then remove them and fine-tune; structure "
                   "channel) (config: finetune.recipe)")
    p.add_argument(f"--{prefix}finetune-distill", action="store_true", default=None,
                   help="distil from the unpruned model during the fine-tune (config: finetune.distill)")
    p.add_argument(f"--{prefix}finetune-keep", metavar="K", help="which fine-tuned weights are written: auto (best.pt "
                   "or last.pt by the plugin's validation on a val split of 100+ images, else last), last or best "
                   "(config: finetune.keep)")
    p.add_argument(f"--{prefix}finetune-lr-schedule", metavar="S", help="the fine-tune's learning-rate schedule: run "
                   "(the checkpoint's own), linear or cosine (config: finetune.lr_schedule)")
    p.add_argument(f"--{prefix}finetune-distill-features", type=float, metavar="W",
                   help="with the distillation: a feature term on the neck outputs that feed Detect, W x YOLOv5's "
                   "loss at the start (config: finetune.distill_features)")
    for flag, key, metavar, what in TARGET_FLAGS:
        p.add_argument(f"--{prefix}target-{flag}", type=float, metavar=metavar,
                       help=f"{what} (target.{key}; instead of an amount)")
    p.add_argument(f"--{prefix}target-imgsz", metavar="auto|N,N", help="also search the input size: auto (stride "
                   "multiples down to about 0.6 of --img) or sizes, e.g. 416,352,320 (target.imgsz; with a speed-up "
                   "budget)")
    p.add_argument(f"--{prefix}target-after-finetune", type=int, metavar="N", help="fine-tune the chosen point for "
                   "N epochs and check target.max_drop on the fine-tuned model (target.after_finetune)")


#: budget flags: ``--target-drop`` (prune) / ``--prune-target-drop`` (train) -> ``target.max_drop``, ...
TARGET_FLAGS = (("drop", "max_drop", "D", "largest mAP50-95 drop from the dense model, e.g. 0.01"),
                ("speedup", "min_speedup", "X", "smallest ONNX Runtime speed-up, e.g. 1.5; structure channel"),
                ("size", "max_size", "R", "largest params ratio pruned/dense, e.g. 0.6; structure channel"))
_TARGET_KEYS = {flag: key for flag, key, _, _ in TARGET_FLAGS}


def _target_override(ns: argparse.Namespace, prefix: str) -> Optional[dict]:
    """``--target-*`` flags as a ``target`` override (None when none is given)."""
    pre = prefix.replace("-", "_")
    given = {key: getattr(ns, f"{pre}target_{flag}", None) for flag, key, _, _ in TARGET_FLAGS}
    given["imgsz"] = getattr(ns, f"{pre}target_imgsz", None)
    given["after_finetune"] = getattr(ns, f"{pre}target_after_finetune", None)
    given = {k: v for k, v in given.items() if v is not None}
    return given or None


def _config_from_args(ns: argparse.Namespace, prefix: str) -> Optional[PruneConfig]:
    pre = prefix.replace("-", "_")
    keys = ("amount", "method", "structure", "include", "exclude", "checkpoints", "suffix", "export", "overwrite",
            "evaluate", "bench")
    overrides = {k: getattr(ns, pre + k, None) for k in keys}
    overrides["target"] = _target_override(ns, prefix)
    path = getattr(ns, pre + "config", None)
    finetune = {k: v for k, v in (("epochs", getattr(ns, pre + "finetune_epochs", None)),
                                  ("distill", getattr(ns, pre + "finetune_distill", None)),
                                  ("recipe", getattr(ns, pre + "finetune_recipe", None)),
                                  ("distill_features", getattr(ns, pre + "finetune_distill_features", None)),
                                  ("keep", getattr(ns, pre + "finetune_keep", None)),
                                  ("lr_schedule", getattr(ns, pre + "finetune_lr_schedule", None)))
                if v is not None}
    if prefix and path is None and not finetune and all(v is None for v in overrides.values()):
        return None  # `yolo-prune train` without any prune option behaves exactly like YOLOv5's train
    for k, v in overrides.items():  # name the flag in errors: "--prune-amount: 'amount' must ..."
        if v is not None and k != "target":
            config_from_dict({k: v}, source=f"--{prefix}{'no-eval' if k == 'evaluate' else k}")
    if overrides["target"] and overrides["amount"] is not None:
        raise ConfigError(f"--{prefix}amount and --{prefix}target-*: a fixed amount and a budget are alternatives; "
                          "give one of them")
    if overrides["target"]:  # merged with a YAML 'target:' section (flags win key by key)
        base = load_config(path).target if path else None
        overrides["target"] = {**(base.__dict__ if base else {}), **overrides["target"]}
    cfg = load_config(path, **overrides)
    for k, v in finetune.items():  # each value checked under its flag's name ("--finetune-keep: ..."); how the
        # values combine with the rest of the config is checked once, below
        check_finetune_value(k, v, f"--{prefix}finetune-{k.replace('_', '-')}")
    if finetune:
        cfg = cfg.with_overrides(finetune={**cfg.finetune.__dict__, **finetune})
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yolo-prune", allow_abbrev=False, description="Prune YOLOv5 detectors to one global Conv2d "
                                     "sparsity, re-evaluate with YOLOv5's validator, export and verify.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", allow_abbrev=False, help="YOLOv5 training (every train.py flag) with the pruning hook",
                       description="Runs YOLOv5's own training. All train.py flags are accepted as-is; the "
                       "--prune-* flags below override the YAML given by --prune-config. Without any --prune-* "
                       "flag it behaves exactly like YOLOv5's train.", add_help=True)
    _prune_options(t, "prune-")
    _common(t)

    p = sub.add_parser("prune", help="prune an existing checkpoint (writes <stem>_pruned.pt beside it)")
    p.add_argument("--weights", required=True, help="YOLOv5 .pt checkpoint")
    p.add_argument("--data", help="dataset YAML (for evaluation and data-aware methods)")
    p.add_argument("--img", "--imgsz", dest="imgsz", type=int, default=640, help="image size (default 640)")
    p.add_argument("--batch-size", type=int, default=None, help="val batch size (default 32, as val.py); with "
                   "--finetune-epochs also the training batch (default: the checkpoint's run, else 16)")
    p.add_argument("--device", default="", help="cuda device (0, 0,1) or cpu; default: GPU when available")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--single-cls", action="store_true")
    _prune_options(p, "")
    _common(p)

    e = sub.add_parser("export", help="export a (pruned) checkpoint and verify the zeros survived")
    e.add_argument("--weights", required=True)
    e.add_argument("--include", required=True, help="formats, e.g. onnx,torchscript")
    e.add_argument("--img", "--imgsz", dest="imgsz", type=int, default=None,
                   help="input size (default: the deploy_imgsz a budget search stored in the file, else 640)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--half", action="store_true")
    e.add_argument("--dynamic", action="store_true")
    e.add_argument("--simplify", action="store_true")
    e.add_argument("--opset", type=int, default=None)
    e.add_argument("--atol", type=float, default=1e-3, help="largest allowed output difference (default 1e-3)")
    e.add_argument("--overwrite", action="store_true", help="replace existing artefacts")
    _common(e)

    s = sub.add_parser("sweep", help="evaluate many (method, amount) points in one process")
    s.add_argument("--weights", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--amounts", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    s.add_argument("--methods", default="global,lamp")
    s.add_argument("--img", "--imgsz", dest="imgsz", type=int, default=640)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--device", default="")
    s.add_argument("--workers", type=int, default=8)
    s.add_argument("--out", default=None, help="output folder (default: <weights folder>/sweep)")
    s.add_argument("--layers-point", default=None, metavar="METHOD:AMOUNT",
                   help="point whose per-layer sparsity goes to layers.png (default: first method at 0.5, else its largest amount)")
    s.add_argument("--exist-ok", action="store_true", help="write into an existing output folder")
    _common(s)

    bn = sub.add_parser("bench", help="latency of checkpoints side by side: PyTorch eager and ONNX Runtime CPU")
    bn.add_argument("--weights", required=True, nargs="+", help="YOLOv5 .pt files; speed-up is vs the first")
    bn.add_argument("--img", "--imgsz", dest="imgsz", type=int, default=640, help="image size (default 640)")
    bn.add_argument("--batch", "--batch-size", dest="batch", type=int, default=1, help="batch size (default 1)")
    bn.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime")
    bn.add_argument("--runs", type=int, default=50, help="timed runs per model (default 50)")
    bn.add_argument("--warmup", type=int, default=5, help="untimed runs per model first (default 5)")
    bn.add_argument("--backends", default="torch,onnxruntime", help="torch,onnxruntime (default both)")
    bn.add_argument("--device", default="cpu", help="where PyTorch eager runs: cpu or a CUDA index (ONNX Runtime: CPU)")
    bn.add_argument("--json", default=None, metavar="FILE", help="also write the rows to this JSON file")
    _common(bn)

    d = sub.add_parser("demo", help="generate the synthetic dataset, train a small YOLOv5 on it with pruning")
    d.add_argument("--dir", default="runs/yolo-prune-demo", help="working folder (default runs/yolo-prune-demo)")
    d.add_argument("--amount", type=float, default=None)
    d.add_argument("--method", default=None)
    d.add_argument("--epochs", type=int, default=None, help="override the demo's epoch count")
    d.add_argument("--device", default="")
    _common(d)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    if rest and ns.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    handler, level = _setup_logging(ns.verbose)
    try:
        with sigterm_as_interrupt(), contextlib.ExitStack() as scope:
            early_checks(ns, rest)  # the user's own paths and device, before torch/YOLOv5 are imported
            if ns.trust_checkpoint:
                from .backend.loading import trusted_loading

                LOGGER.warning("yolo_prune_plugin: --trust-checkpoint: loading checkpoints WITHOUT the class "
                               "allow-list")
                scope.enter_context(trusted_loading())
            return COMMANDS[ns.command](ns, rest)
    except PruneError as e:
        print(f"yolo-prune: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except Exception as e:  # noqa: BLE001 - a bug or an unforeseen YOLOv5 error: one line, the traceback with -v
        from .backend.loading import first_line

        LOGGER.debug("traceback", exc_info=True)
        print(f"yolo-prune: error: {first_line(e)}; run with --verbose for the traceback", file=sys.stderr)
        return 1
    except Terminated:
        print("yolo-prune: terminated (SIGTERM); unfinished outputs were removed", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("yolo-prune: interrupted", file=sys.stderr)
        return 130
    finally:
        if handler is not None:
            LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so ``finally`` blocks (temporary-file cleanup) run as on Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like SIGINT while the command runs (main thread only); restores the previous handler."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train_paths(rest: list[str]) -> argparse.Namespace:
    """The few YOLOv5 train flags checked early (everything else is YOLOv5's to parse)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--weights", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--device", default="")
    p.add_argument("--resume", nargs="?", const=True, default=False)
    return p.parse_known_args(rest)[0]


def early_checks(ns: argparse.Namespace, rest: list[str]) -> None:
    """Errors about the user's own arguments, before any heavy import and any work.

    Paths (``--weights``, ``--data``, the config YAML) are checked with the standard library only; the
    device check imports torch but not YOLOv5.
    """
    from .backend.checks import check_device, check_file_path, check_user_paths

    cmd = ns.command
    if cmd == "train":
        t = _train_paths(rest)
        prune_on = any(v is not None for k, v in vars(ns).items() if k.startswith("prune_"))
        if prune_on and not t.resume:
            check_user_paths(t.weights, t.data, ns.prune_config, allow_release=True)
        check_device(t.device)
    elif cmd == "prune":
        check_file_path(ns.config, "--config", "prune config YAML")
        check_user_paths(ns.weights, ns.data)
        check_device(ns.device)
    elif cmd in ("export", "sweep"):
        check_user_paths(ns.weights, getattr(ns, "data", None))
        check_device(ns.device)
    elif cmd == "bench":
        for w in ns.weights:
            check_user_paths(w, None)
        check_device(ns.device)
    elif cmd == "demo":
        check_device(ns.device)


def _cmd_train(ns: argparse.Namespace, rest: list[str]) -> int:
    from .api import run_training, train_opt
    from .backend.loading import get_backend

    config = _config_from_args(ns, "prune-")  # validated before YOLOv5 is even imported
    backend = get_backend(ns.yolov5_dir)
    opt = train_opt(rest, backend)
    plugin = run_training(opt, config, backend)
    if plugin is not None and plugin.error is not None:
        return 1
    if plugin is not None and not plugin.ran:
        print("yolo-prune: error: training ended without running the pruning hook (stopped early?)", file=sys.stderr)
        return 1
    return 0


def _cmd_prune(ns: argparse.Namespace, rest: list[str]) -> int:
    from .api import prune
    from .backend.loading import get_backend

    config = _config_from_args(ns, "")
    get_backend(ns.yolov5_dir)
    prune(ns.weights, ns.data, config, imgsz=ns.imgsz, batch_size=ns.batch_size, device=ns.device,
          workers=ns.workers, single_cls=ns.single_cls)
    return 0


def _cmd_export(ns: argparse.Namespace, rest: list[str]) -> int:
    from .backend.export import check_export_requirements, export_and_verify, saved_deploy_imgsz
    from .backend.loading import get_backend

    formats = [f.strip().lower() for f in ns.include.split(",") if f.strip()]
    backend = get_backend(ns.yolov5_dir)
    check_export_requirements(formats, simplify=ns.simplify)
    imgsz = ns.imgsz or saved_deploy_imgsz(Path(ns.weights).resolve(), backend) or 640
    if ns.imgsz is None and imgsz != 640:
        print(f"Exporting at --img {imgsz}: the input size the budget search chose (stored in {ns.weights})")
    arts = export_and_verify(Path(ns.weights).resolve(), formats, imgsz=imgsz, device=ns.device, half=ns.half,
                             dynamic=ns.dynamic, simplify=ns.simplify, opset=ns.opset, atol=ns.atol,
                             overwrite=ns.overwrite, announce=False)  # the table below says it
    ok = True
    for a in arts:
        d = a.to_dict()
        ok &= bool(d.get("ok"))
        print(f"{d['format']:<12} {'OK ' if d.get('ok') else 'FAIL'} {d['path']}  {d.get('bytes', 0):,} B "
              f"(gzip {d.get('gzip_bytes', 0):,} B)  zeros {d.get('zeros')}/{d.get('expected_zeros')}  "
              f"max|diff| {d.get('max_abs_diff')}  {d.get('message') or ''}")
    return 0 if ok else 1


def _cmd_sweep(ns: argparse.Namespace, rest: list[str]) -> int:
    from .backend.loading import get_backend
    from .backend.patches import driving_yolov5
    from .tools.sweep import run_sweep

    with driving_yolov5(get_backend(ns.yolov5_dir)):
        run_sweep(ns.weights, ns.data, amounts=ns.amounts, methods=ns.methods, imgsz=ns.imgsz,
                  batch_size=ns.batch_size, device=ns.device, workers=ns.workers, out=ns.out,
                  layers_point=ns.layers_point, exist_ok=ns.exist_ok)
    return 0


def _cmd_bench(ns: argparse.Namespace, rest: list[str]) -> int:
    from .backend.loading import get_backend
    from .tools.bench import bench_files, format_bench_table

    get_backend(ns.yolov5_dir)
    backends = [x.strip() for x in ns.backends.split(",") if x.strip()]
    rows = bench_files(ns.weights, imgsz=ns.imgsz, batch=ns.batch, threads=ns.threads, runs=ns.runs,
                       warmup=ns.warmup, backends=backends, progress=True, device=ns.device)
    print(format_bench_table(rows))
    if ns.json:
        from .utils.files import write_json

        write_json({"bench": rows}, Path(ns.json))
    return 0


def _cmd_demo(ns: argparse.Namespace, rest: list[str]) -> int:
    from .demo import run_demo

    return run_demo(ns.dir, amount=ns.amount, method=ns.method, epochs=ns.epochs, device=ns.device,
                    yolov5_dir=ns.yolov5_dir)


COMMANDS = {"train": _cmd_train, "prune": _cmd_prune, "export": _cmd_export, "sweep": _cmd_sweep, "bench": _cmd_bench,
            "demo": _cmd_demo}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
