"""scripts/check_gpu.py: without CUDA it says so and exits 0 (on a GPU machine it runs every CUDA path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: run scripts/check_gpu.py itself")
def test_check_gpu_without_cuda_exits_0():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_gpu.py")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no CUDA device" in r.stdout
