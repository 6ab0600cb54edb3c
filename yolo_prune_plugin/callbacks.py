"""YOLOv5 ``Callbacks`` integration: prune when training ends (rank -1/0 only).

A failure inside the hook is logged with the command to retry and recorded on the plugin; it never
raises into YOLOv5, so ``best.pt``/``last.pt`` and the run's other outputs stay as training left them.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Any, Optional

import torch

from .adapter import Backend, get_backend, load_checkpoint
from .config import DATA_AWARE_METHODS, PruneConfig, load_config
from .errors import PruneError
from .evaluation import Metrics, backend_select_device, make_settings
from .loggers import find_yolo_loggers
from .runner import check_exports, prune_checkpoint, write_report

LOGGER = logging.getLogger("yolo_prune_plugin")
HOOK_NAME = "yolo_prune_plugin"


def current_rank() -> int:
    """Global rank under ``torch.distributed.run`` (-1 when not distributed)."""
    return int(os.getenv("RANK", -1))


def is_main_process() -> bool:
    return current_rank() in (-1, 0)


class PrunePlugin:
    """Holds the config and the outcome of the train-end pruning of one training run."""

    def __init__(self, config: Optional[PruneConfig] = None, opt: Any = None, backend: Optional[Backend] = None):
        self.config = config or load_config()
        self.opt = opt
        self.backend = backend
        self.entries: list[dict] = []
        self.report_path: Optional[Path] = None
        self.error: Optional[BaseException] = None
        self.ran = False
        self._resolved_opt: dict = {}  # training options as the hook found them (for the retry command)

    # -- YOLOv5 hooks -----------------------------------------------------------------------------
    def on_train_end(self, last: Any, best: Any, epoch: int, results: Any) -> None:
        """YOLOv5 ``on_train_end(last, best, epoch, results)``; fires after ``strip_optimizer``."""
        if not is_main_process():
            return  # only rank -1/0 prunes, evaluates, exports and writes
        self.ran = True
        try:
            self.run(Path(last), Path(best), results)
        except Exception as e:  # noqa: BLE001 - never kill a finished training run
            self.error = e
            LOGGER.error("yolo_prune_plugin: pruning at train end failed: %s\n"
                         "  Your training outputs (best.pt, last.pt, results) are untouched. Retry with:\n  %s",
                         e if isinstance(e, PruneError) else f"{type(e).__name__}: {e}", self.retry_command(best))
            if not isinstance(e, PruneError):
                LOGGER.debug("traceback", exc_info=True)

    # -- work ---------------------------------------------------------------------------------------
    def _opt(self, best: Path, last: Path) -> dict:
        if self.opt is not None:
            return dict(vars(self.opt)) if not isinstance(self.opt, dict) else dict(self.opt)
        for f in (best, last):
            if f.is_file():
                opt = load_checkpoint(f, self.backend).get("opt")
                if isinstance(opt, dict):
                    return opt
        raise PruneError(f"{best}: no training options ('opt') in the checkpoint; cannot tell data/image size")

    def checkpoints(self, last: Path, best: Path) -> list[Path]:
        """The files to prune: ``checkpoints`` in config; ``best`` falls back to ``last`` when absent."""
        out: list[Path] = []
        for name in self.config.checkpoints:
            f = best if name == "best" else last
            if not f.is_file() and name == "best" and last.is_file():
                LOGGER.info("yolo_prune_plugin: %s not found, pruning %s instead", best.name, last.name)
                f = last
            if not f.is_file():
                raise PruneError(f"{f}: checkpoint not found after training (is --nosave set?)")
            if f not in out:
                out.append(f)
        return out

    def run(self, last: Path, best: Path, results: Any = None) -> list[dict]:
        backend = self.backend or get_backend()
        opt = self._opt(best, last)
        self._resolved_opt = opt
        world = int(os.getenv("WORLD_SIZE", 1))
        local_rank = int(os.getenv("LOCAL_RANK", -1))
        device = (torch.device("cuda", local_rank) if local_rank != -1 else
                  backend_select_device(backend, opt.get("device", ""), 0))
        imgsz = int(opt.get("imgsz", 640))
        settings = None
        if self.config.evaluate or self.config.method in DATA_AWARE_METHODS or self.config.sweep.amounts:
            batch = max(int(opt.get("batch_size", 16)) // world * 2, 1)  # train.py's val batch size
            settings = make_settings(opt["data"], imgsz, batch, device, bool(opt.get("single_cls", False)),
                                     int(opt.get("workers", 8)), backend)
        files = self.checkpoints(last, best)
        entries = []
        for f in files:
            # train.py's final validation ran on best.pt: reuse those numbers instead of validating again
            before = Metrics.from_results(results) if (results is not None and f == best and best.is_file()) else None
            entries.append(prune_checkpoint(f, self.config, settings, before=before, backend=backend, device=device,
                                            imgsz=imgsz))
        self.entries = entries
        extra = None
        if self.config.sweep.amounts:
            from .sweep import run_sweep

            sw = run_sweep(files[0], settings.data, self.config.sweep.amounts, self.config.sweep.methods,
                           out=best.parent.parent / "sweep", config=self.config, settings=settings, backend=backend,
                           echo=LOGGER.info)
            extra = {"sweep": {"outputs": sw["outputs"], "dense": sw["dense"], "points": sw["points"]}}
        self.report_path = write_report(entries, self.config, best.parent.parent, extra=extra, echo=LOGGER.info,
                                        yolo_loggers=find_yolo_loggers(getattr(self, "callbacks", None)))
        check_exports(entries)
        return entries

    def retry_command(self, best: Any) -> str:
        opt = self._resolved_opt
        if not opt and self.opt is not None:
            opt = dict(self.opt) if isinstance(self.opt, dict) else dict(vars(self.opt))
        c = self.config
        parts = ["yolo-prune", "prune", "--weights", str(best)]
        if opt.get("data"):
            parts += ["--data", str(opt["data"])]
        if opt.get("imgsz"):
            parts += ["--img", str(opt["imgsz"])]
        parts += ["--amount", str(c.amount), "--method", c.method]
        if c.include:
            parts += ["--include", ",".join(c.include)]
        if c.exclude:
            parts += ["--exclude", ",".join(c.exclude)]
        if c.export:
            parts += ["--export", ",".join(c.export)]
        return " ".join(shlex.quote(p) for p in parts)


def register(callbacks: Any, config: Optional[PruneConfig] = None, opt: Any = None, **overrides: Any) -> PrunePlugin:
    """Register the train-end pruning hook on a YOLOv5 ``Callbacks`` instance and return the plugin.

    ``overrides`` are config keys (``amount=0.5``, ``method="lamp"``) applied on top of ``config``.
    """
    cfg = config or load_config()
    if overrides:
        cfg = cfg.with_overrides(**overrides)
    plugin = PrunePlugin(cfg, opt=opt)
    plugin.callbacks = callbacks  # YOLOv5's Loggers register on it later; loggers.find_yolo_loggers finds them
    callbacks.register_action("on_train_end", name=HOOK_NAME, callback=plugin.on_train_end)
    return plugin
