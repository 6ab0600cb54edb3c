"""utils/validate.py: each check returns the (converted) good value and rejects a bad one with a one-line
ConfigError naming the source, the key, the value and what is allowed."""

from __future__ import annotations

import math
import re

import pytest

from yolo_prune_plugin.errors import ConfigError
from yolo_prune_plugin.utils import validate as v

W = "cfg.yaml"  # the source named first in every message


def _raises(fn, *args, match, **kwargs):
    with pytest.raises(ConfigError, match=match) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{W}: "), msg
    return msg


@pytest.mark.parametrize("value, want", [(None, "null"), (True, "bool"), (3, "int"), ("a", "str"), ([1], "list")])
def test_type_name(value, want):
    assert v._type_name(value) == want


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, 3, -2, 0.5, 1e-9])
def test_number_accepts(value):
    out = v._number(value, "k", W)
    assert out == value and type(out) is type(value)


@pytest.mark.parametrize("value, shown", [
    (True, "True (bool)"), ("0.3", "'0.3' (str)"), (None, "None (null)"), ([1], "[1] (list)"),
    (math.nan, "nan (float)"), (math.inf, "inf (float)"),
])
def test_number_rejects(value, shown):
    _raises(v._number, value, "lr_scale", W, match=re.escape(f"{W}: 'lr_scale' must be a number, got {shown}") + "$")


@pytest.mark.parametrize("value", [0, 7, -1])
def test_integer_accepts(value):
    assert v._number(value, "k", W, integer=True) == value


@pytest.mark.parametrize("value, shown", [(2.0, "2.0 (float)"), (False, "False (bool)"), ("8", "'8' (str)")])
def test_integer_rejects(value, shown):
    _raises(v._number, value, "seed", W, integer=True,
            match=re.escape(f"'seed' must be an integer, got {shown}") + "$")


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [True, False])
def test_bool_accepts(value):
    assert v._bool(value, "k", W) is value


@pytest.mark.parametrize("value, shown", [(1, "1 (int)"), ("yes", "'yes' (str)"), (None, "None (null)")])
def test_bool_rejects(value, shown):
    _raises(v._bool, value, "evaluate", W, match=re.escape(f"'evaluate' must be true or false, got {shown}") + "$")


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, want", [
    (["a", "b"], ("a", "b")), (("x",), ("x",)), ("onnx, torchscript", ("onnx", "torchscript")),
    ("a,,b,", ("a", "b")), ([], ()),
])
def test_str_list_accepts(value, want):
    assert v._str_list(value, "k", W) == want


@pytest.mark.parametrize("value", [["a", ""], ["a", 1], 5, None, {"a": 1}])
def test_str_list_rejects(value):
    _raises(v._str_list, value, "export", W,
            match=f"'export' must be a list of non-empty strings, got {re.escape(repr(value))}$")


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, 0.0, 0.3, 0.999])
def test_amount_accepts(value):
    out = v._amount(value, "amount", W)
    assert out == value and isinstance(out, float)


@pytest.mark.parametrize("value, shown", [(1, "1.0"), (1.5, "1.5"), (-0.1, "-0.1")])
def test_amount_rejects_out_of_range(value, shown):
    _raises(v._amount, value, "amount", W,
            match=re.escape(f"'amount' must satisfy 0 <= amount < 1 (fraction of Conv2d weights set to zero), "
                            f"got {shown}") + "$")


def test_amount_rejects_non_number():
    _raises(v._amount, "0.3", "amount", W, match="'amount' must be a number, got '0.3'")


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["onnx", "torch"])
def test_choice_accepts(value):
    assert v._choice(value, "runtime", W, ("onnx", "torch")) == value


@pytest.mark.parametrize("value", ["ONNX", "tensorrt", None, 1])
def test_choice_rejects_listing_allowed(value):
    _raises(v._choice, value, "runtime", W, ("onnx", "torch"),
            match=f"'runtime' must be one of onnx, torch; got {re.escape(repr(value))}$")


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, default, want", [
    (False, True, False), (5, 128, 5), (None, 0, None), (3, None, 3), (None, None, None), (0.5, 0.01, 0.5),
    (2, 0.01, 2.0), ("lamp", "global", "lamp"), ("model.0.*", None, "model.0.*"), (["a", "b"], (), ("a", "b")),
    ("a,b", (), ("a", "b")), ([], (), ()), (None, (), ()),
])
def test_typed_option_follows_the_default_type(value, default, want):
    out = v._typed_option(value, "obs.k", W, default)
    assert out == want and type(out) is type(want)


@pytest.mark.parametrize("value, default, match", [
    (1, True, "'obs.k' must be true or false, got 1 \\(int\\)"),
    (1.5, 128, "'obs.k' must be an integer, got 1.5 \\(float\\)"),
    (True, 128, "'obs.k' must be an integer, got True \\(bool\\)"),
    ("x", 0.01, "'obs.k' must be a number, got 'x' \\(str\\)"),
    (3, "global", "'obs.k' must be a string, got 3 \\(int\\)"),
    ([1], (), "'obs.k' must be a list of non-empty strings"),
])
def test_typed_option_rejects(value, default, match):
    _raises(v._typed_option, value, "obs.k", W, default, match=match)


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, lo", [(1, 1), (5, 1), (0, 0)])
def test_at_least_accepts(value, lo):
    assert v._at_least(value, "k", W, lo) == value


@pytest.mark.parametrize("value, lo, match", [
    (0, 1, "'epochs' must be >= 1, got 0$"), (-1, 0, "'epochs' must be >= 0, got -1$"),
    (2.5, 0, "'epochs' must be an integer, got 2.5"),
])
def test_at_least_rejects(value, lo, match):
    _raises(v._at_least, value, "epochs", W, lo, match=match)


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, kw", [
    (0.5, {}), (1e-9, {}), (0, {"lo_closed": True}), (10, {"hi_closed": True}), (10.0, {"hi_closed": True}),
])
def test_in_range_accepts(value, kw):
    out = v._in_range(value, "k", W, 0, 10, **kw)
    assert out == value and isinstance(out, float)


@pytest.mark.parametrize("value, kw, interval", [
    (0, {}, "(0, 10)"), (10, {}, "(0, 10)"), (0, {"hi_closed": True}, "(0, 10]"),
    (10, {"lo_closed": True}, "[0, 10)"), (11, {"lo_closed": True, "hi_closed": True}, "[0, 10]"),
    (-1, {"lo_closed": True, "hi_closed": True}, "[0, 10]"),
])
def test_in_range_rejects_writing_the_interval(value, kw, interval):
    _raises(v._in_range, value, "lr_scale", W, 0, 10, **kw,
            match=re.escape(f"'lr_scale' must be in {interval}, got {value}") + "$")


def test_in_range_note_is_in_the_message():
    _raises(v._in_range, 2, "target.max_drop", W, 0, 1, note=" (a fraction)",
            match=re.escape("'target.max_drop' must be in (0, 1) (a fraction), got 2") + "$")


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, hint", [("ammount", "; did you mean 'amount'?"), ("zzz", "")])
def test_unknown_key_lists_allowed_and_suggests(key, hint):
    e = v._unknown_key(key, ["amount", "method", "include"], W)
    assert isinstance(e, ConfigError)
    assert str(e) == f"{W}: unknown key '{key}'{hint} (allowed: amount, method, include)"
