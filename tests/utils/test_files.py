"""utils/files.py: atomic writes (old file kept and no temporary left on failure), stale temporaries of killed
runs found and removed, JSON written through the same path."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from yolo_prune_plugin.utils import files
from yolo_prune_plugin.utils.files import (atomic_path, atomic_write_text, remove_stale_temp_files, stale_temp_files,
                                           write_json)

DEAD_PID = 2**31 - 1  # above any pid_max: no such process


def _tmp(dest: Path, pid: int, rand: str = "abc123") -> Path:
    """A temporary file named the way atomic_path names them."""
    p = dest.parent / f".{dest.name}.yp{pid}-{rand}.tmp"
    p.write_text("partial")
    return p


def test_write_text_replaces_content_and_leaves_only_dest(tmp_path):
    dest = tmp_path / "report.txt"
    dest.write_text("old")
    atomic_write_text("new ✓\n", dest)
    assert dest.read_text(encoding="utf-8") == "new ✓\n"
    assert os.listdir(tmp_path) == ["report.txt"]


def test_atomic_path_creates_missing_parent_folders(tmp_path):
    dest = tmp_path / "a" / "b" / "out.json"
    with atomic_path(dest) as tmp:
        assert tmp.parent == dest.parent and tmp != dest
        assert not dest.exists()  # nothing at the destination until the block succeeds
        tmp.write_text("x")
    assert dest.read_text() == "x"
    assert os.listdir(dest.parent) == ["out.json"]


@pytest.mark.parametrize("exc", [RuntimeError("writer failed"), KeyboardInterrupt()])
def test_failed_write_keeps_old_file_and_removes_temporary(tmp_path, exc):
    dest = tmp_path / "best_pruned.pt"
    dest.write_bytes(b"old checkpoint")
    with pytest.raises(type(exc)), atomic_path(dest) as tmp:
        tmp.write_bytes(b"half-writ")
        assert tmp.exists()
        raise exc
    assert dest.read_bytes() == b"old checkpoint"
    assert os.listdir(tmp_path) == ["best_pruned.pt"]


def test_failed_first_write_leaves_nothing(tmp_path):
    dest = tmp_path / "new.txt"
    with pytest.raises(ValueError, match="boom"), atomic_path(dest) as tmp:
        tmp.write_text("partial")
        raise ValueError("boom")
    assert os.listdir(tmp_path) == []


def test_result_has_umask_permissions_not_mkstemps_0600(tmp_path):
    dest = tmp_path / "x.txt"
    old = os.umask(0o027)
    try:
        atomic_write_text("x", dest)
    finally:
        os.umask(old)
    assert dest.stat().st_mode & 0o777 == 0o640


def test_temporary_name_is_recognised_as_ours_while_alive(tmp_path):
    dest = tmp_path / "r.json"
    with atomic_path(dest) as tmp:
        m = files._TMP_RE.match(tmp.name)
        assert m and m.group("dest") == "r.json" and int(m.group("pid")) == os.getpid()
        assert stale_temp_files(dest) == []  # this process is alive: its own temporary is not stale


def test_stale_only_for_dead_pids_and_this_destination(tmp_path):
    dest = tmp_path / "prune_report.json"
    dead = _tmp(dest, DEAD_PID)
    _tmp(dest, os.getpid(), "mine")  # this process
    _tmp(dest, os.getppid(), "parent")  # another live process
    _tmp(tmp_path / "other.json", DEAD_PID)  # another destination
    _tmp(tmp_path / "prune_report.json.bak", DEAD_PID)  # a name that only starts like dest
    (tmp_path / f".prune_report.json.yp{DEAD_PID}.tmp").write_text("no random part")
    assert stale_temp_files(dest) == [dead]
    assert stale_temp_files(str(dest)) == [dead]


def test_stale_with_glob_characters_in_name(tmp_path):
    dest = tmp_path / "run[1]*.json"
    dead = _tmp(dest, DEAD_PID)
    _tmp(tmp_path / "run1x.json", DEAD_PID)  # would match if [1]* were a pattern
    assert stale_temp_files(dest) == [dead]


def test_stale_in_missing_folder_is_empty(tmp_path):
    assert stale_temp_files(tmp_path / "nope" / "x.json") == []


def test_remove_stale_deletes_and_logs(tmp_path, caplog):
    dest = tmp_path / "best.pt"
    dead = [_tmp(dest, DEAD_PID, "a1"), _tmp(dest, DEAD_PID, "b2")]
    alive = _tmp(dest, os.getpid(), "c3")
    with caplog.at_level(logging.INFO, logger="yolo_prune_plugin"):
        removed = remove_stale_temp_files(dest)
    assert sorted(removed) == sorted(dead)
    assert not any(p.exists() for p in dead) and alive.exists()
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert sorted(msgs) == sorted(f"yolo_prune_plugin: removed {p}, left by an earlier run that was killed"
                                  for p in dead)
    assert remove_stale_temp_files(dest) == []  # nothing left to do


def test_atomic_path_cleans_stale_temporaries_first(tmp_path):
    dest = tmp_path / "out.txt"
    dead = _tmp(dest, DEAD_PID)
    alive = _tmp(dest, os.getppid(), "live")
    with atomic_path(dest) as tmp:
        assert not dead.exists() and alive.exists()
        tmp.write_text("ok")
    assert sorted(os.listdir(tmp_path)) == sorted(["out.txt", alive.name])


def test_write_json_converts_paths_tensors_and_to_dict(tmp_path):
    class Row:
        def to_dict(self):
            return {"format": "onnx", "ok": True}

    dest = tmp_path / "r.json"
    write_json({"path": Path("/a/b.pt"), "loss": torch.tensor(0.5), "n": torch.tensor(3), "row": Row()}, dest)
    text = dest.read_text()
    assert text.endswith("}\n") and text.startswith('{\n  "path"')  # indented, newline at the end
    assert json.loads(text) == {"path": "/a/b.pt", "loss": 0.5, "n": 3, "row": {"format": "onnx", "ok": True}}


def test_write_json_unserialisable_keeps_old_file(tmp_path):
    dest = tmp_path / "r.json"
    dest.write_text('{"old": 1}\n')
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        write_json({"x": object()}, dest)
    assert json.loads(dest.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["r.json"]
