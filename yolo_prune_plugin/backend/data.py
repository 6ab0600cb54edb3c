"""YOLOv5's data layout: which image files a split entry (folder, list file, or list of them) names."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ..errors import ConfigError

LOGGER = logging.getLogger("yolo_prune_plugin")


IMG_SUFFIXES = (".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm")


def image_files(entry: str | Path | list, root: Optional[Path] = None) -> list[Path]:
    """Absolute, sorted, de-duplicated image files of a YOLOv5 split entry (folder, list file, or a list of them)."""
    entries = entry if isinstance(entry, (list, tuple)) else [entry]
    out: list[Path] = []
    for e in entries:
        p = Path(str(e)).expanduser()
        if not p.is_absolute() and root is not None:
            p = root / p
        if p.is_dir():
            out += [f for f in p.rglob("*") if f.suffix.lower() in IMG_SUFFIXES]
        elif p.is_file() and p.suffix.lower() == ".txt":
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line:
                    q = Path(line)
                    out.append(q if q.is_absolute() else (p.parent / q))
        elif p.is_file() and p.suffix.lower() in IMG_SUFFIXES:
            out.append(p)
        else:
            raise ConfigError(f"{p}: split entry is neither an image folder, a .txt list nor an image")
    return sorted({f.resolve() for f in out})
