"""YOLOv5 ``Callbacks`` integration: one :func:`register` for every mode (rank -1/0 only works).

Thin hooks: one-shot and fine-tune prune at ``on_train_end`` through :func:`yolo_prune_plugin.pipeline.run`;
schedule mode also drives :class:`~yolo_prune_plugin.training.schedule.GradualPruning` during training. A failure inside
a hook is logged with the command to retry and recorded on the plugin; it never raises into YOLOv5, so
``best.pt``/``last.pt`` and the run's other outputs stay as training left them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from .backend.distributed import is_main_process, rank
from .backend.evaluation import Metrics, resolve_data
from .backend.loading import Backend, backend_of_callbacks, first_line, get_backend, load_checkpoint
from .backend.patches import driving_yolov5
from .backend.training_loop import running_train_opt
from .config import PruneConfig, ScheduleOptions, load_config
from .errors import PruneError
from .report import ReportEntry
from .tools.heldout import overlap_plan
from .tools.loggers import find_yolo_loggers
from .utils.files import atomic_write_text

LOGGER = logging.getLogger("yolo_prune_plugin")
HOOK_NAME = "yolo_prune_plugin"

__all__ = ["PrunePlugin", "register", "current_rank", "is_main_process", "HOOK_NAME"]


current_rank = rank  # global rank under ``torch.distributed.run`` (-1 when not distributed)


class PrunePlugin:
    """The config, the hooks and the outcome of pruning one training run (any mode)."""

    def __init__(self, config: Optional[PruneConfig] = None, opt: Any = None, backend: Optional[Backend] = None):
        from .training.finetune import check_recovery
        from .training.schedule import GradualPruning

        self.config = config or load_config()
        check_recovery(self.config, opt)  # a mode that cannot run here is an error now, before any epoch
        if self.config.structure == "channel" and self.config.schedule.final_amount is not None:
            from .training.channel_schedule import check_channel_schedule

            check_channel_schedule(self.config, opt)
        self.opt = opt
        self.backend = backend or get_backend()
        self.mode = ("schedule" if self.config.schedule.final_amount is not None else
                     "finetune" if self.config.finetune.epochs else "oneshot")
        self.entries: list[ReportEntry] = []
        self.history: list[dict] = []
        self.report_path: Optional[Path] = None
        self.error: Optional[BaseException] = None
        self.ran = False
        self.callbacks: Any = None  # set by register(): YOLOv5's Loggers (trackers) are found on it
        self._overlap_checked = False  # see on_pretrain_routine_start
        self._resolved_opt: dict = {}  # training options as the hook found them (for the retry command)
        self._best: Any = None  # best.pt of the run being pruned (for the retry command)
        self._scope = contextlib.ExitStack()  # the compat patches while YOLOv5 trains (3-line path)
        self._scoped = False
        self.gradual = None
        if self.mode == "schedule":
            from .training.channel_schedule import ChannelSchedule

            self.gradual = (ChannelSchedule if self.config.structure == "channel" else GradualPruning)(self.config,
                                                                                                     self.backend)
        self.regularizer = None
        if self.config.channel.regularize is not None and self.mode != "schedule":
            from .training.channel_regularize import ChannelRegularizer

            self.regularizer = ChannelRegularizer(self.config, self.backend)

    # -- registration ------------------------------------------------------------------------------
    def hooks(self) -> dict[str, Callable[..., None]]:
        """YOLOv5 hook name -> bound method, for this plugin's mode."""
        names = ["on_pretrain_routine_start", "on_train_end"]
        if self.mode == "schedule":
            names += ["on_train_start", "on_train_epoch_start", "on_fit_epoch_end", "on_model_save"]
        elif self.regularizer is not None:
            names += ["on_train_start", "on_train_epoch_start", "on_fit_epoch_end", "on_model_save"]
        return {n: getattr(self, n) for n in names}

    # -- YOLOv5 hooks -----------------------------------------------------------------------------
    def on_pretrain_routine_start(self) -> None:
        """Training begins: YOLOv5 7.0.x needs the compat patches (offline font, Pillow, numpy) until it ends.
        Registered without the run's options (``register(callbacks)`` + ``train.main``, where ``api.preflight``
        did not run), the train/val overlap decisions are made now, before the first epoch: an explicit choice
        that needs disjoint splits raises here and training does not start."""
        if not self._scoped:
            self._scope.enter_context(driving_yolov5(self.backend))
            self._scoped = True
        if self.opt is None and not self._overlap_checked and is_main_process():
            self._overlap_checked = True
            opt = running_train_opt()
            if opt is not None and getattr(opt, "data", None) and not getattr(opt, "resume", False):
                overlap_plan(self.config, resolve_data(opt.data, self.backend))

    def on_train_start(self) -> None:
        if self.regularizer is not None:
            self._guard("channel.regularize setup", self.regularizer.train_start)
        else:
            self._guard("gradual pruning setup", lambda: self.gradual.train_start())

    def on_train_epoch_start(self) -> None:
        if self.regularizer is not None:
            self._guard("channel.regularize targets", self.regularizer.epoch_start)
        else:
            self._guard("gradual pruning step", lambda: self.gradual.epoch_start())

    def on_fit_epoch_end(self, log_vals: Any, epoch: int, best_fitness: Any, fi: Any) -> None:
        if self.regularizer is not None:
            from .training.channel_regularize import val_map

            self._guard("channel.regularize log", lambda: self.regularizer.fit_epoch_end(epoch, val_map(log_vals)))
            self.history = self.regularizer.history
        elif is_main_process():
            self._guard("schedule bookkeeping", lambda: self.gradual.fit_epoch_end(log_vals, epoch, fi))

    def on_model_save(self, last: Any, epoch: int, final_epoch: Any, best_fitness: Any, fi: Any) -> None:
        if self.regularizer is not None:
            self._guard("channel.regularize best.pt epoch",
                        lambda: self.regularizer.model_save(epoch, best_fitness, fi))
        elif is_main_process():
            self._guard("schedule bookkeeping", lambda: self.gradual.model_save(last, epoch, fi))

    def on_train_end(self, last: Any, best: Any, epoch: int, results: Any) -> None:
        """YOLOv5 ``on_train_end(last, best, epoch, results)``; fires after ``strip_optimizer``."""
        try:
            if not is_main_process():
                return  # only rank -1/0 prunes, evaluates, exports and writes
            self.ran = True
            try:
                self.run(Path(last), Path(best), results, int(epoch))
            except Exception as e:  # noqa: BLE001 - never kill a finished training run
                self._fail(e, "pruning at train end")
        finally:
            if self.gradual is not None:
                self.gradual.close()
            if self.regularizer is not None:
                self.regularizer.close()
            self._scope.close()
            self._scoped = False

    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        if self.error is not None or (self.gradual is None and self.regularizer is None):
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - never kill the training run; reported at train end
            if self.gradual is not None:
                self.gradual.error = e
            else:
                self.regularizer.close()
            self._fail(e, what, retry=False)

    def _fail(self, e: BaseException, what: str, retry: bool = True) -> None:
        self.error = e
        msg = e if isinstance(e, PruneError) else f"{self._best or 'the run'}: {first_line(e)}"
        if retry and self._best is not None:
            try:
                cmd = self.retry_command(self._best)
            except Exception as r:  # noqa: BLE001 - the original error is what matters
                cmd = f"yolo-prune prune --weights {shlex.quote(str(self._best))} ... (retry config not written: {r})"
            LOGGER.error("yolo_prune_plugin: %s failed: %s\n  Your training outputs (best.pt, last.pt, results) are "
                         "untouched. Retry with:\n  %s", what, msg, cmd)
        else:
            LOGGER.error("yolo_prune_plugin: %s failed: %s", what, msg)
        if not isinstance(e, PruneError):
            LOGGER.debug("traceback", exc_info=True)

    # -- work ---------------------------------------------------------------------------------------
    def checkpoints(self, last: Path, best: Path) -> list[Path]:
        """The files to prune: ``checkpoints`` in config; ``best`` falls back to ``last`` when absent."""
        out: list[Path] = []
        for name in self.config.checkpoints:
            f = best if name == "best" else last
            if name == "best" and self.regularizer is not None and self.regularizer.best_before_penalty():
                LOGGER.info("yolo_prune_plugin: %s is from epoch %d, before channel.regularize's penalty began "
                            "(epoch %d): pruning %s, the regularised model, instead", best.name,
                            self.regularizer.best_epoch, self.regularizer.history[0]["epoch"], last.name)
                f = last
            if not f.is_file() and name == "best" and last.is_file():
                LOGGER.info("yolo_prune_plugin: %s not found, pruning %s instead", best.name, last.name)
                f = last
            if not f.is_file():
                raise PruneError(f"{f}: checkpoint not found after training (is --nosave set?)")
            if f not in out:
                out.append(f)
        return out

    def _options(self, ckpt: Optional[dict], best: Path) -> dict:
        if self.opt is not None:
            return dict(vars(self.opt)) if not isinstance(self.opt, dict) else dict(self.opt)
        opt = (ckpt or {}).get("opt")
        if isinstance(opt, dict):
            return opt
        raise PruneError(f"{best}: no training options ('opt') in the checkpoint; cannot tell data/image size")

    def run(self, last: Path, best: Path, results: Any = None, epoch: int = -1) -> list[ReportEntry]:
        """The train-end work: every checkpoint loaded once, through the one pipeline, then the report."""
        from . import pipeline

        self._best = best
        backend = self.backend
        ckpts: dict[Path, dict] = {}
        files = [last]  # schedule mode: the sweep starts from the final training state
        with driving_yolov5(backend):
            if self.mode == "schedule":
                cand, model, section, leaks, before_row = self.gradual.result(last, best, epoch)
                opt = self._resolved_opt = self._options(cand, best)
                ctx = pipeline.context_from_opt(opt, self.config, backend)
                dense = self.gradual.dense.before(self.gradual.history)  # never the pruned model's numbers
                self.entries = [pipeline.run(last, self.config, ctx, ckpt=cand, pruned=model, mode="schedule",
                                             out=pipeline.output_path(best, self.config), schedule=section,
                                             leaks=leaks, before=dense.metrics, reference=dense.reference,
                                             channels=getattr(self.gradual, "channels", None),
                                             before_source=dense.source)]
                self.history = self.gradual.history
            else:
                files = self.checkpoints(last, best)
                ckpts = {f: load_checkpoint(f, backend) for f in files}  # each file loaded once
                opt = self._resolved_opt = self._options(ckpts[files[0]], best)
                ctx = pipeline.context_from_opt(opt, self.config, backend)
                if self.regularizer is not None and self.regularizer.plan:
                    ctx.channel_plan = self.regularizer.plan  # remove what the penalty trained away, exactly
                self.entries = []
                for f in files:
                    # train.py's final validation ran on best.pt: reuse those numbers instead of validating again
                    before = Metrics.from_results(results) if (results is not None and f == best) else None
                    self.entries.append(pipeline.run(f, self.config, ctx, ckpt=ckpts[f], before=before,
                                                     before_source="YOLOv5's final validation" if before else None))
                    if self.entries[-1].finetune:
                        self.history = (self.regularizer.history if self.regularizer else []) + \
                            self.entries[-1].finetune["history"]
            sweep = None
            if self.config.sweep.amounts:
                from .tools.sweep import run_sweep

                sw = run_sweep(files[0], ctx.settings.data, self.config.sweep.amounts, self.config.sweep.methods,
                               out=best.parent.parent / "sweep", config=self.config, settings=ctx.settings,
                               backend=backend, echo=LOGGER.info,
                               ckpt=ckpts.get(files[0]))
                sweep = {"outputs": sw["outputs"], "dense": sw["dense"], "points": sw["points"]}
            self.report_path = pipeline.write_report(self.entries, self.config, best.parent.parent,
                                                     history=self.history or None, sweep=sweep, echo=LOGGER.info,
                                                     yolo_loggers=find_yolo_loggers(self.callbacks))
        pipeline.check_exports(self.entries)
        return self.entries

    def retry_command(self, best: Any) -> str:
        """``yolo-prune prune`` line(s) that redo this run's pruning exactly: the resolved config is written as
        YAML beside the run (:func:`write_retry_config`) and passed with ``--config``, with the run's data, image
        size, device and validation batch. A fine-tune or a schedule is left out of that file (the line's
        ``--batch-size`` is the validation batch, not the run's training batch), and a last line says how to redo
        it."""
        from .pipeline import val_batch_size

        opt = self._resolved_opt
        if not opt and self.opt is not None:
            opt = dict(self.opt) if isinstance(self.opt, dict) else dict(vars(self.opt))
        c, note = self.config, ""
        if c.finetune.epochs:
            c = replace(c, finetune=replace(c.finetune, epochs=0))
            n = self.config.finetune.epochs
            note = (f"(this redoes the one-shot prune; to redo the {n}-epoch fine-tune too, add --finetune-epochs {n} "
                    f"--batch-size <the run's batch> to the line above, or train again with --prune-config {{cfg}} "
                    f"--prune-finetune-epochs {n})")
        elif c.schedule.final_amount is not None:
            c = replace(c, amount=c.schedule.final_amount, schedule=ScheduleOptions())
            note = ("(this prunes best.pt once at the schedule's final amount; gradual pruning needs a training "
                    "run: train again with the same --prune-config / --prune-* options)")
        best = Path(best)
        cfg = write_retry_config(c, best.parent.parent if best.parent.name == "weights" else best.parent)
        last = best.with_name("last.pt")
        files = [best] if self.mode == "schedule" else [best if n == "best" else last for n in c.checkpoints]
        lines = []
        for f in files:
            parts = ["yolo-prune", "prune", "--config", str(cfg), "--weights", str(f)]
            if opt.get("data"):
                parts += ["--data", str(opt["data"]), "--batch-size", str(val_batch_size(opt))]
            for flag, key in (("--img", "imgsz"), ("--device", "device"), ("--workers", "workers")):
                if opt.get(key) not in (None, ""):
                    parts += [flag, str(opt[key])]
            if opt.get("single_cls"):
                parts.append("--single-cls")
            if self.backend.kind == "checkout":
                parts += ["--yolov5-dir", str(self.backend.root)]
            lines.append(" ".join(shlex.quote(p) for p in parts))
        if note:
            lines.append(note.format(cfg=shlex.quote(str(cfg))))
        return "\n  ".join(lines)


RETRY_CONFIG = "prune_retry.yaml"


def write_retry_config(config: PruneConfig, folder: Path) -> Path:
    """``config`` (every key) as YAML in ``folder`` that :func:`load_config` reads back equal; written atomically.

    An existing file is reused when it holds the same config and never replaced otherwise (the next free name
    ``prune_retry_2.yaml``, ...). Falls back to the temporary folder when ``folder`` is not writable.
    """
    text = ("# yolo_prune_plugin: the resolved prune config of this run, for `yolo-prune prune --config`\n" +
            yaml.safe_dump(config.to_dict(), sort_keys=False))
    for i in range(1, 100):
        path = folder / (RETRY_CONFIG if i == 1 else f"prune_retry_{i}.yaml")
        if path.exists():
            try:
                if load_config(path) == config:
                    return path
            except PruneError:
                pass
            continue
        try:
            atomic_write_text(text, path)
        except OSError:
            break
        return path
    fd, tmp = tempfile.mkstemp(prefix="prune_retry_", suffix=".yaml")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(tmp)


def register(callbacks: Any, config: Optional[PruneConfig] = None, opt: Any = None, **overrides: Any) -> PrunePlugin:
    """Register the plugin on a YOLOv5 ``Callbacks`` instance for whatever ``config`` asks and return it.

    One-shot, fine-tune (``finetune.epochs``), schedule (``schedule.final_amount``), sweep and export all come
    from the config; ``overrides`` are config keys (``amount=0.5``) applied on top. A mode that cannot run in
    this context (a schedule that ends after ``opt.epochs``, a channel schedule under DDP) raises
    :class:`~yolo_prune_plugin.errors.ConfigError` here, before any epoch. Registering also makes YOLOv5's own
    checkpoint loads work on torch >= 2.6 (the plugin's allow-list, process-wide).
    """
    cfg = config or load_config()
    if overrides:
        cfg = cfg.with_overrides(**overrides)
    backend = backend_of_callbacks(callbacks)
    plugin = PrunePlugin(cfg, opt=opt, backend=backend)
    plugin.callbacks = callbacks  # YOLOv5's Loggers register on it later; loggers.find_yolo_loggers finds them
    for hook, fn in plugin.hooks().items():
        callbacks.register_action(hook, name=HOOK_NAME, callback=fn)
    return plugin
