"""Atomic writes: a file is written to a temporary name beside its destination and renamed into place,
so an interrupted run never leaves a half-written report or checkpoint; stale temporaries are cleaned.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

LOGGER = logging.getLogger("yolo_prune_plugin")


#: Temporary files of :func:`atomic_path` are ``.<dest name>.yp<pid>-<random>.tmp``: the pid tells a later run
#: whether the process that made one is gone (killed with SIGKILL, power loss) and the file is garbage.
_TMP_RE = re.compile(r"^\.(?P<dest>.+)\.yp(?P<pid>\d+)-[^./]+\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep the file
    return True


def stale_temp_files(dest: str | Path) -> list[Path]:
    """Temporary files for ``dest`` left by plugin runs whose process no longer exists."""
    dest = Path(dest)
    out = []
    try:
        candidates = list(dest.parent.glob(f".{glob.escape(dest.name)}.yp*-*.tmp"))
    except OSError:
        return []
    for f in candidates:
        m = _TMP_RE.match(f.name)
        if m and m.group("dest") == dest.name and not _pid_alive(int(m.group("pid"))):
            out.append(f)
    return out


def remove_stale_temp_files(dest: str | Path) -> list[Path]:
    """Delete :func:`stale_temp_files` of ``dest``; returns what was removed (logged at INFO)."""
    removed = []
    for f in stale_temp_files(dest):
        try:
            f.unlink()
        except OSError:
            continue
        removed.append(f)
        LOGGER.info("yolo_prune_plugin: removed %s, left by an earlier run that was killed", f)
    return removed


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it is renamed onto ``dest`` in one step.

    On failure (including Ctrl-C, and SIGTERM under ``yolo-prune``) the temporary file is removed and ``dest``
    is left as it was. Temporary files of ``dest`` left by an earlier, killed run are removed first.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.yp{os.getpid()}-", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(text: str, dest: str | Path) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(data: Any, dest: str | Path) -> None:
    atomic_write_text(json.dumps(data, indent=2, default=_json_default) + "\n", dest)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
