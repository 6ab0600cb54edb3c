"""Typed, frozen configuration: loaded from YAML, overridden by flags, validated before training starts.

"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from .errors import ConfigError
from .prune.registry import (CHANNEL_ALLOCATIONS, CHANNEL_IMPORTANCES, OBS_ALLOCATIONS, STRUCTURES, ChannelOptions,
                             ChannelRegularize, ObsOptions, data_aware_names, method_names)

#: Methods selectable by ``method`` (read from the registry); the data-aware ones calibrate on train images.
METHODS = method_names()
DATA_AWARE_METHODS = data_aware_names()
#: ``method: auto`` (the default) prunes with ``obs`` when the run has train-split images disjoint from its val
#: split to calibrate on, else with ``global`` magnitude (see :func:`yolo_prune_plugin.pipeline.resolve_method`).
AUTO = "auto"
METHOD_CHOICES = (AUTO,) + METHODS


def data_free_method(config: "PruneConfig") -> str:
    """The method where no calibration happens (schedule steps, channel runs): ``auto`` means ``global``."""
    return "global" if config.method == AUTO else config.method
CHECKPOINTS = ("best", "last")
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "prune.yaml"


@dataclass(frozen=True)
class ExportOptions:
    """YOLOv5 ``export.run`` options passed through for every exported format."""

    half: bool = False
    dynamic: bool = False
    simplify: bool = False
    opset: Optional[int] = None
    atol: float = 1e-3  # largest allowed output difference between an artefact and the pruned .pt


@dataclass(frozen=True)
class CalibrationOptions:
    """Calibration images for data-aware methods (taken from the training split, never the val split)."""

    images: int = 32  # held-out retention at 50 %: 0.896 with 32, 0.867 with 16 (README)
    batch_size: int = 8
    seed: int = 0
    allow_overlap: bool = False  # accept train images that are also val images (metrics then optimistic)


@dataclass(frozen=True)
class SweepOptions:
    """An optional sweep of (method, amount) points evaluated at train end."""

    amounts: tuple[float, ...] = ()
    methods: tuple[str, ...] = ("global",)


@dataclass(frozen=True)
class FinetuneOptions:
    """Masked fine-tuning after pruning (0 epochs = off)."""

    epochs: int = 0
    lr_scale: float = 0.1
    imgsz: Optional[int] = None
    warmup: bool = False  # YOLOv5's >=100-iteration lr warmup from 0 (most of a short fine-tune)
    distill: bool = False  # add an output-level term from the dense (unpruned) model to YOLOv5's loss
    distill_weight: float = 1.0  # the teacher term's weight (its parts carry YOLOv5's own box/obj/cls gains)


@dataclass(frozen=True)
class ScheduleOptions:
    """Gradual pruning during training (cubic schedule of Zhu & Gupta 2017). ``final_amount`` None = off."""

    start_epoch: int = 0
    end_epoch: int = 0
    final_amount: Optional[float] = None
    every: int = 1


@dataclass(frozen=True)
class BNRecalibrationOptions:
    """BatchNorm statistics re-estimated after pruning on train-split images (no gradient step).

    ``images: null`` = the structure's default, chosen by measurement: 32 for ``channel`` (it always helped),
    0 = off for ``unstructured`` (it lowered held-out mAP after global L1 and after obs).
    """

    images: Optional[int] = None
    batch_size: int = 8

    def count(self, structure: str) -> int:
        if self.images is not None:
            return self.images
        return 32 if structure == "channel" else 0


@dataclass(frozen=True)
class PruneConfig:
    """Everything the plugin needs to prune a checkpoint. Build with :func:`load_config`."""

    amount: float = 0.3
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

    def to_dict(self) -> dict:
        """Plain, JSON/YAML-serialisable form (tuples become lists)."""
        return _plain(asdict(self))

    def with_overrides(self, **overrides: Any) -> "PruneConfig":
        """A new validated config with top-level keys replaced (``None`` values are ignored)."""
        data = self.to_dict()
        data.update({k: v for k, v in overrides.items() if v is not None})
        return config_from_dict(data, source="flags")


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


_NESTED = {"export_options": ExportOptions, "calibration": CalibrationOptions, "sweep": SweepOptions,
           "finetune": FinetuneOptions, "schedule": ScheduleOptions, "obs": ObsOptions, "channel": ChannelOptions,
           "bn_recalibration": BNRecalibrationOptions}


def _unknown_key(key: str, allowed: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint} (allowed: {', '.join(allowed)})")


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _number(v: Any, key: str, where: str, *, integer: bool = False) -> float | int:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or (not integer and not math.isfinite(v)):
        want = "an integer" if integer else "a number"
        raise ConfigError(f"{where}: '{key}' must be {want}, got {v!r} ({_type_name(v)})")
    return v


def _bool(v: Any, key: str, where: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: '{key}' must be true or false, got {v!r} ({_type_name(v)})")
    return v


def _str_list(v: Any, key: str, where: str) -> tuple[str, ...]:
    if isinstance(v, str):  # "a,b" from a flag or a single YAML string
        v = [s for s in (p.strip() for p in v.split(",")) if s]
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and s for s in v):
        raise ConfigError(f"{where}: '{key}' must be a list of non-empty strings, got {v!r}")
    return tuple(v)


def _amount(v: Any, key: str, where: str) -> float:
    v = float(_number(v, key, where))
    if not 0.0 <= v < 1.0:
        raise ConfigError(f"{where}: '{key}' must satisfy 0 <= {key} < 1 (fraction of Conv2d weights set to zero), "
                          f"got {v}")
    return v


def _choice(v: Any, key: str, where: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in allowed:
        raise ConfigError(f"{where}: '{key}' must be one of {', '.join(allowed)}; got {v!r}")
    return v


def _typed_option(v: Any, key: str, where: str, default: Any) -> Any:
    """Validate ``v`` against the type of the option's default (int, float, bool, str, tuple of str, or None)."""
    if isinstance(default, bool):
        return _bool(v, key, where)
    if isinstance(default, int) or (default is None and not isinstance(v, str)):
        return None if v is None else int(_number(v, key, where, integer=True))
    if isinstance(default, float):
        return float(_number(v, key, where))
    if isinstance(default, tuple):
        return _str_list(v, key, where) if v else ()
    if not isinstance(v, str):
        raise ConfigError(f"{where}: '{key}' must be a string, got {v!r} ({_type_name(v)})")
    return v


def _at_least(v: Any, key: str, where: str, lo: int) -> int:
    """An integer ``>= lo``."""
    n = int(_number(v, key, where, integer=True))
    if n < lo:
        raise ConfigError(f"{where}: '{key}' must be >= {lo}, got {v}")
    return n


def _in_range(v: Any, key: str, where: str, lo: float, hi: float, *, lo_closed: bool = False,
              hi_closed: bool = False, note: str = "") -> float:
    """A number within ``lo``..``hi`` (each end open unless closed); the message writes the interval."""
    x = float(_number(v, key, where))
    if not ((lo <= x if lo_closed else lo < x) and (x <= hi if hi_closed else x < hi)):
        interval = f"{'[' if lo_closed else '('}{lo}, {hi}{']' if hi_closed else ')'}"
        raise ConfigError(f"{where}: '{key}' must be in {interval}{note}, got {v}")
    return x


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
            elif k == "distill_weight":
                out[k] = _in_range(v, q, where, 0, 100, lo_closed=True, hi_closed=True)
            else:
                out[k] = None if v is None else int(_number(v, q, where, integer=True))
        elif cls is ChannelRegularize:
            out[k] = _in_range(v, q, where, 0, 1) if k == "weight" else _at_least(v, q, where, 0)
        elif cls is ChannelOptions:
            if k == "importance":
                out[k] = None if v is None else _choice(v, q, where, CHANNEL_IMPORTANCES)
            elif k == "allocation":
                out[k] = _choice(v, q, where, CHANNEL_ALLOCATIONS)
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
            out[k] = _amount(v, k, source)
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
    if cfg.schedule.final_amount is not None and cfg.finetune.epochs:
        raise ConfigError(f"{source}: 'schedule' (prune during training) and 'finetune' (prune, then train) are "
                          "alternatives; set only one")
    if cfg.channel.regularize is not None and cfg.structure != "channel":
        raise ConfigError(f"{source}: 'channel.regularize' trains channels to be removed: it needs 'structure: channel'")
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
        cfg = config_from_dict({**cfg.to_dict(), **{k: v for k, v in overrides.items() if v is not None}},
                               source=f"{source} + flags")
    return cfg


def config_equal(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two configs (as dicts) would produce the same pruned file (output-only keys ignored)."""
    ignore = {"overwrite", "evaluate", "export", "export_options", "sweep", "checkpoints", "bench"}
    return {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}


__all__ = ["PruneConfig", "BNRecalibrationOptions", "ChannelOptions", "ExportOptions", "CalibrationOptions", "SweepOptions", "FinetuneOptions", "ScheduleOptions",
           "METHODS", "METHOD_CHOICES", "AUTO", "data_free_method", "DATA_AWARE_METHODS", "CHECKPOINTS", "load_config", "config_from_dict", "config_equal",
           "replace", "DEFAULT_CONFIG_PATH"]
