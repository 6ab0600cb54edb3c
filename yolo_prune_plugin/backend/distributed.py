"""The ranks of a YOLOv5 run under ``torch.distributed.run`` (DDP): who prunes, and the check that all agree.

YOLOv5 reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment and ``train.main`` initialises the
process group. Rule of the plugin: every rank registers the hooks; only rank 0 (or -1, single process) decides
what is pruned, writes files and evaluates; the other ranks take rank 0's decision (:func:`from_rank0`) and every
rank then proves it holds the same pruned state (:func:`check_identical`). Without an initialised process group
of more than one rank both are no-ops, so single-process runs are unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

from ..errors import PruneError
from .patches import Patch


def rank() -> int:
    """Global rank (-1 when not distributed), as YOLOv5's ``train.py`` reads it."""
    return int(os.getenv("RANK", -1))


def world_size() -> int:
    return int(os.getenv("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Rank -1 (single process) or 0: the one that prunes, writes and evaluates."""
    return rank() in (-1, 0)


def distributed() -> bool:
    """More than one rank and an initialised process group (YOLOv5's ``main`` initialises it)."""
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``broadcast_object_list``); ``obj`` itself when not distributed."""
    if not distributed():
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A short digest of named tensors (names, shapes and values) to compare across ranks."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def check_identical(digest: str, what: str) -> None:
    """Raise :class:`PruneError` on every rank when the ranks' ``digest`` differ (no-op when not distributed)."""
    if not distributed():
        return
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest)
    if len(set(gathered)) > 1:
        raise PruneError(f"{what} differ between DDP ranks ({', '.join(f'rank {i}: {d}' for i, d in enumerate(gathered))}); "
                         "the ranks would train different models")


#: YOLOv5 modules that read the rank variables once, at import (relative to the backend's prefix).
_RANK_MODULES = ("train", "utils.torch_utils", "utils.dataloaders", "utils.general", "utils.loggers", "utils.plots")
_SINGLE = {"LOCAL_RANK": -1, "RANK": -1, "WORLD_SIZE": 1}


def launched_distributed() -> bool:
    """This process was started by ``torch.distributed.run`` (``LOCAL_RANK`` set): YOLOv5's ``main`` would set up
    DDP (and initialise a process group) on every call."""
    return int(os.getenv("LOCAL_RANK", -1)) != -1


@contextlib.contextmanager
def single_process(backend: Any) -> Iterator[str]:
    """Run a second YOLOv5 ``train.main`` in this process as a single-process training (the fine-tune after a DDP
    run, on rank 0 alone): YOLOv5's rank globals and the environment say -1 / -1 / 1 while the block runs, and what
    they were afterwards (also on exceptions). Yields the device to train on (this process's CUDA device, never
    the run's ``--device 0,1``, which would start DataParallel)."""
    p = Patch()
    env = {k: os.environ.get(k) for k in _SINGLE}
    try:
        for rel in _RANK_MODULES:
            try:
                mod = importlib.import_module(backend.prefix + rel)
            except ImportError:
                continue
            for k, v in _SINGLE.items():
                if hasattr(mod, k):
                    p.set(mod, k, v)
        os.environ.update({k: str(v) for k, v in _SINGLE.items()})
        yield str(torch.cuda.current_device()) if torch.cuda.is_available() and torch.cuda.is_initialized() else ""
    finally:
        p.undo()
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
