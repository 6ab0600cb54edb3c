"""Typed, frozen configuration: loaded from YAML, overridden by flags, validated before training starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from .errors import ConfigError
from .prune.registry import (CHANNEL_ALLOCATIONS, CHANNEL_IMPORTANCES, OBS_ALLOCATIONS, STRUCTURES, ChannelOptions,
                             ChannelRegularize, ObsOptions, data_aware_names, method_names)
from .options import (FINETUNE_KEEP, FINETUNE_LR_SCHEDULES, FINETUNE_RECIPES, TARGET_RUNTIMES, TARGET_SIZES,
                      BNRecalibrationOptions, CalibrationOptions, ExportOptions, FinetuneOptions, ScheduleOptions, SweepOptions, TargetOptions)
from .utils.validate import (_amount, _at_least, _bool, _choice, _in_range, _number, _str_list, _type_name,
                             _typed_option, _unknown_key)

#: Methods selectable by ``method`` (read from the registry); the data-aware ones calibrate on train images.
METHODS = method_names()
DATA_AWARE_METHODS = data_aware_names()
#: ``method: auto`` (the default) prunes with ``obs`` when the run has train-split images disjoint from its val
#: split to calibrate on, else with ``global`` magnitude (see :func:`yolo_prune_plugin.prune.calibration.resolve_method`).
AUTO = "auto"
METHOD_CHOICES = (AUTO,) + METHODS


def data_free_method(config: "PruneConfig") -> str:
    """The method where no calibration happens (schedule steps, channel runs): ``auto`` means ``global``."""
    return "global" if config.method == AUTO else config.method


CHECKPOINTS = ("best", "last")
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "prune.yaml"


@dataclass(frozen=True)
class PruneConfig:
    """Everything the plugin needs to prune a checkpoint. Build with :func:`load_config`."""

    amount: Optional[float] = 0.3  # None when `target` chooses it
    method: str = AUTO  # "auto": obs when calibration data is available (train split disjoint from val), else global
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    checkpoints: tuple[str, ...] = ("best",)
    evaluate: bool = True
    suffix: str = "_pruned"
    overwrite: bool = False
    export: tuple[str, ...] = ()
    export_options: ExportOptions = field(default_factory=ExportOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    sweep: SweepOptions = field(default_factory=SweepOptions)
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    schedule: ScheduleOptions = field(default_factory=ScheduleOptions)
    obs: ObsOptions = field(default_factory=ObsOptions)  # options of the obs importance (registry.ObsOptions)
    structure: str = "unstructured"  # unstructured (zeros) | channel (channels removed: smaller and faster)
    channel: ChannelOptions = field(default_factory=ChannelOptions)
    bn_recalibration: BNRecalibrationOptions = field(default_factory=BNRecalibrationOptions)
    bench: bool = False  # time best.pt vs the pruned file (PyTorch eager + ONNX Runtime CPU) into the report
    target: TargetOptions = field(default_factory=TargetOptions)  # prune to a budget instead of a fixed amount

    def to_dict(self) -> dict:
        """Plain, JSON/YAML-serialisable form (tuples become lists)."""
        return _plain(asdict(self))

    def with_overrides(self, **overrides: Any) -> "PruneConfig":
        """A new validated config with top-level keys replaced (``None`` values are ignored)."""
        return config_from_dict(merge_overrides(self.to_dict(), overrides), source="flags")


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


_NESTED = {"export_options": ExportOptions, "calibration": CalibrationOptions, "sweep": SweepOptions,
           "finetune": FinetuneOptions, "schedule": ScheduleOptions, "obs": ObsOptions, "channel": ChannelOptions,
           "bn_recalibration": BNRecalibrationOptions, "target": TargetOptions}


def check_finetune_value(key: str, value: Any, source: str) -> None:
    """One ``finetune`` value alone (a flag named by ``source``; combinations: when the whole config is built)."""
    _nested(FinetuneOptions, {key: value}, "finetune", source)


def _nested(cls: type, data: Any, key: str, where: str) -> Any:
    if isinstance(data, cls):
        return data
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: '{key}' must be a mapping of {', '.join(f.name for f in fields(cls))}; "
                          f"got {data!r}")
    allowed = [f.name for f in fields(cls)]
    for k in data:
        if k not in allowed:
            raise _unknown_key(f"{key}.{k}", [f"{key}.{a}" for a in allowed], where)
    sub = f"{key}."
    out: dict[str, Any] = {}
    for k, v in data.items():
        q = sub + k
        if cls is ExportOptions:
            if k == "opset":
                out[k] = None if v is None else int(_number(v, q, where, integer=True))
                if out[k] is not None and not 7 <= out[k] <= 25:
                    raise ConfigError(f"{where}: '{q}' must be an ONNX opset between 7 and 25, got {v}")
            elif k == "atol":
                out[k] = float(_number(v, q, where))
                if out[k] <= 0:
                    raise ConfigError(f"{where}: '{q}' must be > 0, got {v}")
            else:
                out[k] = _bool(v, q, where)
        elif cls is CalibrationOptions and k == "allow_overlap":
            out[k] = _bool(v, q, where)
        elif cls is CalibrationOptions:
            out[k] = int(_number(v, q, where, integer=True)) if k == "seed" else _at_least(v, q, where, 1)
        elif cls is SweepOptions:
            if k == "amounts":
                if not isinstance(v, (list, tuple, str)):
                    raise ConfigError(f"{where}: '{q}' must be a list of fractions in [0, 1), got {v!r}")
                items = [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else list(v)
                try:
                    items = [float(s) if isinstance(s, str) else s for s in items]
                except ValueError:
                    raise ConfigError(f"{where}: '{q}' must be a list of fractions in [0, 1), got {v!r}") from None
                out[k] = tuple(_amount(a, q, where) for a in items)
            else:
                out[k] = tuple(_choice(m, q, where, METHODS) for m in _str_list(v, q, where))
        elif cls is FinetuneOptions:
            if k == "epochs":
                out[k] = _at_least(v, q, where, 0)
            elif k == "lr_scale":
                out[k] = _in_range(v, q, where, 0, 10, hi_closed=True)
            elif k in ("warmup", "distill"):
                out[k] = _bool(v, q, where)
            elif k in ("distill_weight", "distill_features"):
                out[k] = _in_range(v, q, where, 0, 100, lo_closed=True, hi_closed=True)
            elif k in ("recipe", "lr_schedule", "keep"):
                out[k] = _choice(v, q, where, {"recipe": FINETUNE_RECIPES, "lr_schedule": FINETUNE_LR_SCHEDULES,
                                               "keep": FINETUNE_KEEP}[k])
            elif k == "regularize_share":
                out[k] = _in_range(v, q, where, 0, 1, lo_closed=True, hi_closed=True)
            elif k == "regularize_weight":
                out[k] = _in_range(v, q, where, 0, 1)
            else:
                out[k] = None if v is None else int(_number(v, q, where, integer=True))
        elif cls is ChannelRegularize:
            if k == "max_drop":
                out[k] = None if v is None else _in_range(v, q, where, 0, 1, note=" (mAP50-95, absolute)")
            else:
                out[k] = _in_range(v, q, where, 0, 1) if k == "weight" else _at_least(v, q, where, 0)
        elif cls is ChannelOptions:
            if k == "importance":
                out[k] = None if v is None else _choice(v, q, where, CHANNEL_IMPORTANCES)
            elif k == "allocation":
                out[k] = None if v is None else _choice(v, q, where, CHANNEL_ALLOCATIONS)
            elif k in ("reconstruct", "compensate"):
                out[k] = None if v is None and k == "reconstruct" else _bool(v, q, where)
            elif k == "regularize":
                out[k] = None if v is None else _nested(ChannelRegularize, v, q, where)
            elif k == "round_to":
                out[k] = _at_least(v, q, where, 1)
            elif k == "cost_aware":
                out[k] = _in_range(v, q, where, 0, 4, lo_closed=True, hi_closed=True,
                                   note=" (an exponent; 0 = plain ranking)")
            elif k == "round_share":
                out[k] = _in_range(v, q, where, 0, 1, hi_closed=True,
                                   note=" (largest rounding step as a share of a layer's width)")
            else:
                out[k] = _in_range(v, q, where, 0, 1)
        elif cls is BNRecalibrationOptions:
            out[k] = None if v is None and k == "images" else _at_least(v, q, where, 0 if k == "images" else 1)
        elif cls is ObsOptions:
            out[k] = _typed_option(v, q, where, getattr(ObsOptions(), k))
            if k == "allocation":
                _choice(v, q, where, OBS_ALLOCATIONS)
            elif k in ("blocksize", "batch_size", "steps"):
                _at_least(v, q, where, 1)
            elif k == "samples_per_column":
                _at_least(v, q, where, 0)
            elif k == "damp":
                _in_range(v, q, where, 0, 1)
        elif cls is TargetOptions:
            out[k] = _target_option(v, k, q, where)
        elif cls is ScheduleOptions:
            if k == "final_amount":
                out[k] = None if v is None else _amount(v, q, where)
            else:
                out[k] = _at_least(v, q, where, 1 if k == "every" else 0)
    obj = cls(**out)
    if cls is ScheduleOptions:
        _check_schedule_enabled(obj, data, where)
    if cls is ScheduleOptions and obj.final_amount is not None and obj.end_epoch < obj.start_epoch:
        raise ConfigError(f"{where}: 'schedule.end_epoch' ({obj.end_epoch}) must be >= 'schedule.start_epoch' "
                          f"({obj.start_epoch})")
    return obj


def _target_option(v: Any, k: str, q: str, where: str) -> Any:
    """One ``target.<k>`` value, checked."""
    if k in ("relative", "write_best_effort"):
        return _bool(v, q, where)
    if k == "after_finetune":
        if v is None or v == 0:  # off (false, 0)
            return None
        if v is True:
            raise ConfigError(f"{where}: '{q}' is a number of fine-tune epochs (e.g. 10), not true")
        return _at_least(v, q, where, 1)
    if k == "runtime":
        return _choice(v, q, where, TARGET_RUNTIMES)
    if k == "size_of":
        return _choice(v, q, where, TARGET_SIZES)
    if k in ("threads", "max_evals"):
        return _at_least(v, q, where, 1 if k == "threads" else 2)
    if k == "seed":
        return int(_number(v, q, where, integer=True))
    if k == "imgsz":
        return _target_imgsz(v, q, where)
    if v is None and k in ("max_drop", "min_speedup", "max_size", "search_images"):
        return None
    if k == "search_images":
        return _at_least(v, q, where, 1)
    if k == "max_drop":
        return _in_range(v, q, where, 0, 1, note=" (mAP50-95 points as a fraction, e.g. 0.01)")
    if k == "min_speedup":
        return _in_range(v, q, where, 1, 100, note=" (dense/pruned latency, e.g. 1.5)")
    if k == "max_size":
        return _in_range(v, q, where, 0, 1, note=" (pruned/dense size, e.g. 0.6)")
    if k == "tolerance":
        return _in_range(v, q, where, 0, 0.5, note=" (an amount)")
    return _in_range(v, q, where, 0, 1)  # max_amount


#: every YOLOv5 input size is a multiple of the model's largest stride: 32 (P5 models) or 64 (P6, checked with
#: the model by ``budget_run.check_target``)
IMGSZ_STRIDE = 32


def _target_imgsz(v: Any, q: str, where: str) -> Optional[str | tuple[int, ...]]:
    """``target.imgsz``: None, ``auto``, or input sizes (a list, one size, or ``"416,352"`` from a flag), each a
    positive multiple of 32; returned largest first without repeats."""
    want = (f"{where}: '{q}' must be 'auto' or input sizes that are multiples of {IMGSZ_STRIDE}, "
            "e.g. [416, 352, 320]")
    if v is None:
        return None
    if isinstance(v, str):
        if v.strip().lower() == "auto":
            return "auto"
        try:
            v = [int(x) for x in v.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"{want}; got {v!r}") from None
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, (list, tuple)) or not v:
        raise ConfigError(f"{want}; got {v!r}")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int):
            raise ConfigError(f"{want}; got {x!r} ({type(x).__name__})")
        if x <= 0 or x % IMGSZ_STRIDE:
            near = max(IMGSZ_STRIDE, round(x / IMGSZ_STRIDE) * IMGSZ_STRIDE)
            raise ConfigError(f"{want}; {x} is not (nearest: {near})")
    return tuple(sorted(set(v), reverse=True))


def _check_target(cfg: "PruneConfig", where: str) -> None:
    """What a ``target:`` section cannot be combined with (raised before any work)."""
    t = cfg.target
    if not t.active:  # knobs without a limit: refused by api.preflight (a flag may still add the limit)
        return
    if cfg.schedule.final_amount is not None:
        raise ConfigError(f"{where}: 'target' searches one-shot amounts; it cannot drive 'schedule' (gradual "
                          "pruning): remove one of them")
    if cfg.structure != "channel" and (t.min_speedup is not None or t.max_size is not None):
        key = "target.min_speedup" if t.min_speedup is not None else "target.max_size"
        raise ConfigError(f"{where}: '{key}' needs 'structure: channel' (zeros inside dense tensors make the model "
                          "neither faster nor smaller); use target.max_drop with structure: unstructured")
    if t.imgsz is not None and t.min_speedup is None and t.max_size is None:
        raise ConfigError(f"{where}: 'target.imgsz' trades accuracy for speed: it needs target.min_speedup (or "
                          "target.max_size); with target.max_drop alone the dense model at its own size is the most "
                          "accurate answer")
    if t.relative and t.max_drop is None:
        raise ConfigError(f"{where}: 'target.relative' applies to target.max_drop, which is not set")
    n = t.after_finetune
    if n and cfg.finetune.epochs and cfg.finetune.epochs != n:
        raise ConfigError(f"{where}: 'target.after_finetune' ({n}) fine-tunes the chosen point for {n} epochs but "
                          f"'finetune.epochs' is {cfg.finetune.epochs}: set one of them (or both to the same number)")


def merge_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """``base`` (a config as a dict) with the non-None ``overrides`` applied; flags win over the file, so a
    ``target`` override drops the base ``amount`` and an ``amount`` override drops the base ``target`` (both in
    one source stay and validation refuses the pair)."""
    data = dict(base)
    given = {k: v for k, v in overrides.items() if v is not None}
    data.update(given)
    if "target" in given and "amount" not in given:
        data["amount"] = None
    if "amount" in given and "target" not in given:
        data["target"] = None
    return data


def _check_schedule_enabled(obj: ScheduleOptions, data: Mapping[str, Any], where: str) -> None:
    """A ``schedule:`` section that says something but has no ``final_amount`` is an error, not silently off.

    ``final_amount`` alone switches gradual pruning on; ``amount`` is not inherited (it has a default, 0.3, and
    flags override it after the YAML is read, so an inherited target would be easy to get by accident). Off is
    ``schedule:`` absent, empty, or ``final_amount: null`` with the other keys at their defaults (the
    documented default file and ``PruneConfig.to_dict`` write it that way).
    """
    if obj.final_amount is not None:
        return
    set_keys = [k for k in data if k != "final_amount"]
    changed = [f.name for f in fields(ScheduleOptions)
               if f.name != "final_amount" and getattr(obj, f.name) != f.default]
    if "final_amount" not in data and set_keys:
        raise ConfigError(f"{where}: 'schedule.final_amount' is missing: 'schedule' sets {', '.join(set_keys)} but "
                          "gradual pruning needs its final sparsity, e.g. schedule: {final_amount: 0.5} (the "
                          "top-level 'amount' is not used by a schedule); remove 'schedule' to prune once at "
                          "train end")
    if changed:
        raise ConfigError(f"{where}: 'schedule.final_amount' is null (schedule off) but 'schedule' sets "
                          f"{', '.join(changed)}; set schedule.final_amount to prune during training, or remove "
                          "the other schedule keys to prune once at train end")


def config_from_dict(data: Mapping[str, Any] | None, source: str = "config") -> PruneConfig:
    """Validate a mapping (from YAML or flags) into a :class:`PruneConfig`.

    Raises :class:`ConfigError` naming ``source``, the key, the value and what is allowed.
    """
    data = dict(data or {})
    allowed = [f.name for f in fields(PruneConfig)]
    for k in data:
        if not isinstance(k, str) or k not in allowed:
            raise _unknown_key(str(k), allowed, source)
    out: dict[str, Any] = {}
    for k, v in data.items():
        if k == "amount":
            out[k] = None if v is None else _amount(v, k, source)
        elif k == "method":
            out[k] = _choice(v, k, source, METHOD_CHOICES)
        elif k in ("include", "exclude"):
            out[k] = _str_list(v, k, source) if v is not None else ()
        elif k == "checkpoints":
            items = _str_list(v, k, source)
            for c in items:
                _choice(c, k, source, CHECKPOINTS)
            if not items:
                raise ConfigError(f"{source}: 'checkpoints' must name at least one of {', '.join(CHECKPOINTS)}")
            out[k] = tuple(dict.fromkeys(items))
        elif k == "structure":
            out[k] = _choice(v, k, source, STRUCTURES)
        elif k in ("evaluate", "overwrite", "bench"):
            out[k] = _bool(v, k, source)
        elif k == "suffix":
            if not isinstance(v, str) or not v or any(c in v for c in "/\\:") or v.startswith("."):
                raise ConfigError(f"{source}: 'suffix' must be a non-empty file-name fragment such as '_pruned', "
                                  f"got {v!r}")
            out[k] = v
        elif k == "export":
            out[k] = tuple(s.lower() for s in _str_list(v, k, source)) if v else ()
        else:
            out[k] = _nested(_NESTED[k], v, k, source)
    cfg = PruneConfig(**out)
    if cfg.target.active and cfg.amount is not None and "amount" in data:
        raise ConfigError(f"{source}: 'target' chooses the amount; remove 'amount' ({cfg.amount}) or the "
                          "target (a fixed amount and a budget are alternatives)")
    if cfg.target.active and cfg.amount is not None:
        cfg = replace(cfg, amount=None)
    if cfg.amount is None and not cfg.target.active:
        raise ConfigError(f"{source}: 'amount' is null; set a fraction in [0, 1) or a 'target' budget")
    _check_target(cfg, source)
    if cfg.target.active and cfg.target.after_finetune:  # the budget's fine-tune is the pipeline's finetune stage
        cfg = replace(cfg, finetune=replace(cfg.finetune, epochs=cfg.target.after_finetune))
    if cfg.schedule.final_amount is not None and cfg.finetune.epochs:
        raise ConfigError(f"{source}: 'schedule' (prune during training) and 'finetune' (prune, then train) are "
                          "alternatives; set only one")
    if cfg.finetune.distill_features > 0 and not cfg.finetune.distill:
        raise ConfigError(f"{source}: 'finetune.distill_features' ({cfg.finetune.distill_features:g}) needs "
                          "'finetune.distill: true' (or --finetune-distill): it is a term of the distillation")
    if cfg.finetune.recipe == "regularize" and cfg.structure != "channel":
        raise ConfigError(f"{source}: 'finetune.recipe: regularize' trains away the channels a channel prune "
                          "removes: it needs 'structure: channel' (or finetune.recipe: plain)")
    if cfg.finetune.recipe == "regularize" and cfg.channel.regularize is not None:
        raise ConfigError(f"{source}: 'finetune.recipe: regularize' and 'channel.regularize' both train the plan "
                          "away (after training / during it): set only one")
    if cfg.channel.regularize is not None and cfg.structure != "channel":
        raise ConfigError(f"{source}: 'channel.regularize' trains channels to be removed: it needs 'structure: channel'")
    if cfg.channel.regularize is not None and cfg.target.active:
        raise ConfigError(f"{source}: 'channel.regularize' trains away the channels of a fixed 'amount' from "
                          f"epoch {cfg.channel.regularize.from_epoch} on; 'target' chooses the amount only at train "
                          "end: set 'amount' instead of the target")
    if cfg.structure == "channel":
        if cfg.method not in ("global", AUTO):
            raise ConfigError(f"{source}: 'method: {cfg.method}' ranks single weights (structure: unstructured); "
                              "with 'structure: channel' choose 'channel.importance' "
                              f"({', '.join(CHANNEL_IMPORTANCES)})")
        one_shot = [k for k, on in (("allocation: sensitivity", cfg.channel.allocation == "sensitivity"),
                                    ("reconstruct", cfg.channel.reconstruct), ("compensate", cfg.channel.compensate),
                                    ("regularize", cfg.channel.regularize is not None)) if on]
        if one_shot and cfg.schedule.final_amount is not None:
            raise ConfigError(f"{source}: 'channel.{one_shot[0]}' is for one-shot channel pruning; a 'schedule' run "
                              "prunes by 'global' ranking without reconstruction (set it to global / false)")
    return cfg


def load_config(path: str | Path | None = None, **overrides: Any) -> PruneConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply non-None ``overrides``."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path).expanduser()
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found (expected a YAML file of prune options)")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{p}: expected a mapping of prune options at the top level, got {_type_name(loaded)}")
        # a config may nest everything under a top-level 'prune:' key (e.g. inside a larger YAML)
        if set(loaded) == {"prune"} and isinstance(loaded["prune"], Mapping):
            loaded = loaded["prune"]
        data = dict(loaded)
    cfg = config_from_dict(data, source=source)
    if any(v is not None for v in overrides.values()):
        cfg = config_from_dict(merge_overrides(cfg.to_dict(), overrides), source=f"{source} + flags")
    return cfg


def config_equal(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two configs (as dicts) would produce the same pruned file (output-only keys ignored; a key missing
    from an older file's config, such as ``target``, counts as its default)."""
    ignore = {"overwrite", "evaluate", "export", "export_options", "sweep", "checkpoints", "bench"}
    base = {"target": asdict(TargetOptions())}
    return ({k: v for k, v in {**base, **a}.items() if k not in ignore} ==
            {k: v for k, v in {**base, **b}.items() if k not in ignore})


__all__ = ["PruneConfig", "TargetOptions", "merge_overrides", "BNRecalibrationOptions", "ChannelOptions", "ExportOptions", "CalibrationOptions", "SweepOptions", "FinetuneOptions", "ScheduleOptions",
           "METHODS", "METHOD_CHOICES", "AUTO", "data_free_method", "DATA_AWARE_METHODS", "CHECKPOINTS", "load_config", "config_from_dict", "config_equal",
           "replace", "DEFAULT_CONFIG_PATH"]
