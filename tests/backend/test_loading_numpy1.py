"""Checkpoints pickled under numpy 1 (``numpy.core.multiarray``) load; a malicious file of that family does not."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from yolo_prune_plugin.backend.loading import load_checkpoint
from yolo_prune_plugin.errors import UnsafeCheckpointError

from testkit import save_checkpoint


def rewrite_pickle(src: Path, dst: Path, replace: list[tuple[bytes, bytes]]) -> Path:
    """Copy torch zip checkpoint ``src`` to ``dst`` with byte substitutions in its protocol-2 ``data.pkl``.

    Protocol 2 spells globals as ``GLOBAL 'module\\nname\\n'`` text, so a substitution renames a global exactly
    as a pickle written under another numpy (or by an attacker) would name it.
    """
    writer = torch._C.PyTorchFileWriter(str(dst))
    with zipfile.ZipFile(src) as z:
        for info in z.infolist():
            rel = info.filename.split("/", 1)[1]
            if rel == ".data/serialization_id" or rel.startswith(".format_version") or rel == ".storage_alignment":
                continue  # written by the writer itself
            data = z.read(info)
            if rel == "data.pkl":
                for a, b in replace:
                    data = data.replace(a, b)
            writer.write_record(rel, data, len(data))
    writer.write_end_of_file()
    return dst


NUMPY1 = [(b"numpy._core.multiarray", b"numpy.core.multiarray")]


@pytest.fixture
def np_ckpt(small_model, tmp_path) -> Path:
    # best_fitness and extra numpy values as train.py writes them
    return save_checkpoint(small_model, tmp_path / "np2.pt", best_fitness=np.array([0.25]),
                           scalar=np.float64(0.5), ints=np.arange(3, dtype=np.int64))


def test_fixture_really_uses_numpy1_spelling(np_ckpt, tmp_path):
    out = rewrite_pickle(np_ckpt, tmp_path / "np1.pt", NUMPY1)
    with zipfile.ZipFile(out) as z:
        pkl = z.read([n for n in z.namelist() if n.endswith("data.pkl")][0])
    assert b"numpy.core.multiarray\n_reconstruct" in pkl and b"numpy._core" not in pkl


def test_numpy1_pickled_checkpoint_loads(backend, np_ckpt, tmp_path):
    path = rewrite_pickle(np_ckpt, tmp_path / "np1.pt", NUMPY1)
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt["best_fitness"], np.ndarray) and ckpt["best_fitness"].tolist() == [0.25]
    assert float(ckpt["scalar"]) == 0.5 and ckpt["ints"].tolist() == [0, 1, 2]
    # YOLOv5's own loader (weights_only torch.load) takes it too
    assert backend.attempt_load(path, "cpu").nc == 3


@pytest.mark.parametrize("target", [
    b"numpy.core.multiarray\n_vec_string",      # same module family, not on the allow-list
    b"numpy.core.multiarray\nfromfile",
    b"posix\nsystem",
    b"numpy.core._internal\n_ctypes",
])
def test_malicious_global_in_numpy1_family_is_refused(backend, np_ckpt, tmp_path, target):
    path = rewrite_pickle(np_ckpt, tmp_path / "evil.pt", [(b"numpy._core.multiarray\n_reconstruct", target)])
    with pytest.raises(UnsafeCheckpointError, match=r"evil.pt: refused to load: its pickle references "):
        load_checkpoint(path)
