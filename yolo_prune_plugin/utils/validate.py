"""Validation of config values: each error is one line naming the source, the key, the value and what is allowed."""

from __future__ import annotations

import difflib
import math
from typing import Any

from ..errors import ConfigError


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
