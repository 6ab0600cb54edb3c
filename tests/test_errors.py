"""errors.py: the exception hierarchy callers rely on, and how ``yolo-prune`` reports a PruneError: one line on
stderr, no traceback, exit 2 for a ConfigError and 1 for any other PruneError (cheap: no YOLOv5 run)."""

from __future__ import annotations

import inspect

import pytest

from yolo_prune_plugin import cli, errors
from yolo_prune_plugin.errors import (BudgetError, CheckpointError, ConfigError, ExportError, OutputExistsError,
                                      PruneError, UnsafeCheckpointError, YOLOv5CallError)

ALL_ERRORS = [c for _, c in inspect.getmembers(errors, inspect.isclass)
              if issubclass(c, BaseException) and c.__module__ == errors.__name__]


HIERARCHY = [
    (ConfigError, (PruneError, ValueError)),
    (CheckpointError, (PruneError,)),
    (UnsafeCheckpointError, (CheckpointError, PruneError)),
    (OutputExistsError, (PruneError, FileExistsError, OSError)),
    (ExportError, (PruneError,)),
    (BudgetError, (PruneError,)),
    (YOLOv5CallError, (PruneError,)),
]


def test_every_error_of_the_module_is_a_prune_error():
    assert set(ALL_ERRORS) == {PruneError} | {c for c, _ in HIERARCHY}  # a new error gets a row in HIERARCHY
    for cls in ALL_ERRORS:
        assert issubclass(cls, PruneError), cls
        assert cls.__doc__ and cls.__doc__.strip(), cls  # each says what it is for


@pytest.mark.parametrize("cls, bases", HIERARCHY, ids=[c.__name__ for c, _ in HIERARCHY])
def test_hierarchy(cls, bases):
    e = cls("what went wrong")
    for b in bases:
        assert isinstance(e, b)
    assert str(e) == "what went wrong"


def test_callers_can_catch_by_the_builtin_type():
    with pytest.raises(ValueError, match="bad key"):
        raise ConfigError("bad key")
    with pytest.raises(FileExistsError, match="exists"):
        raise OutputExistsError("exists")
    assert not issubclass(PruneError, (ValueError, OSError))  # the base is not a ValueError itself
    assert not issubclass(CheckpointError, ValueError) and not issubclass(YOLOv5CallError, ValueError)


@pytest.fixture
def weights(tmp_path):
    """Any existing file passes the CLI's early path check (nothing here loads it)."""
    w = tmp_path / "best.pt"
    w.write_bytes(b"")
    return w


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("yolo-prune: error: "), err
    assert "Traceback" not in err
    return err


def test_bad_amount_exits_2_with_one_line(weights, capsys):
    assert cli.main(["prune", "--weights", str(weights), "--amount", "1.5", "--device", "cpu"]) == 2
    err = _one_line_error(capsys)
    assert "--amount: 'amount' must satisfy 0 <= amount < 1" in err
    assert not weights.with_name("best_pruned.pt").exists()


def test_missing_weights_is_a_checkpoint_error_exit_1(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert cli.main(["prune", "--weights", str(missing), "--device", "cpu"]) == 1
    err = _one_line_error(capsys)
    assert f"{missing}: no such file (--weights expects a YOLOv5 .pt checkpoint)" in err


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_cli_prints_any_prune_error_as_one_line(cls, weights, capsys, monkeypatch):
    def command(ns, rest):
        raise cls(f"{cls.__name__} raised by the command")

    monkeypatch.setitem(cli.COMMANDS, "bench", command)
    rc = cli.main(["bench", "--weights", str(weights), "--device", "cpu"])
    assert rc == (2 if issubclass(cls, ConfigError) else 1)
    err = _one_line_error(capsys)
    assert err == f"yolo-prune: error: {cls.__name__} raised by the command\n"
    assert "--verbose" not in err  # expected errors: no hint to look for a traceback


def test_other_exceptions_are_one_line_with_a_verbose_hint(weights, capsys, monkeypatch):
    """The contrast: a non-PruneError is a bug or a YOLOv5 failure, reported with the hint to rerun -v."""
    def command(ns, rest):
        raise RuntimeError("unexpected\nsecond line")

    monkeypatch.setitem(cli.COMMANDS, "bench", command)
    assert cli.main(["bench", "--weights", str(weights), "--device", "cpu"]) == 1
    err = _one_line_error(capsys)
    assert "unexpected" in err and "run with --verbose for the traceback" in err and "second line" not in err
