"""A non-editable install (``pip install .``) carries every subpackage and runs from the installed copy.

The wheel is built offline from a copy of the project (no build isolation: the venv's setuptools), so the
source tree gets no ``build/`` or ``*.egg-info``; it is installed with ``pip install --target`` and imported in a
subprocess whose working directory is outside the project.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PKG = "yolo_prune_plugin"
SOURCE = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / PKG).rglob("*.py"))


def _pip(*args: str, cwd: Path) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    r = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"pip {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built offline from a copy of its top-level files and the package."""
    if importlib.util.find_spec("setuptools.command.bdist_wheel") is None and importlib.util.find_spec("wheel") is None:
        pytest.skip("building a wheel without build isolation needs setuptools >= 70.1 or the 'wheel' package")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for f in ROOT.iterdir():  # setup.cfg, pyproject.toml, README.md (long_description), ...; no weights
        if f.is_file() and (f.suffix in {".cfg", ".toml", ".md", ".txt", ".in", ".py"} or f.name.startswith("LICENSE")):
            shutil.copy2(f, src / f.name)
    shutil.copytree(ROOT / PKG, src / PKG, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _pip("wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), cwd=tmp)
    wheels = list((tmp / "dist").glob(f"{PKG}-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_source_tree_has_subpackages():
    """The comparison below means something only if there are subpackages to lose."""
    inits = [p for p in SOURCE if p.endswith("/__init__.py") and p.count("/") == 2]
    assert len(inits) >= 5, inits


def test_wheel_carries_every_module(wheel):
    with zipfile.ZipFile(wheel) as z:
        members = sorted(n for n in z.namelist() if n.startswith(f"{PKG}/") and n.endswith(".py"))
    missing = sorted(set(SOURCE) - set(members))
    extra = sorted(set(members) - set(SOURCE))
    assert not missing, f"the wheel lacks {missing} (setup.cfg [options.packages.find] include?)"
    assert not extra, f"the wheel has modules the source tree lacks: {extra}"


def test_installed_copy_imports_and_runs(wheel, tmp_path):
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel), cwd=tmp_path)
    modules = [p[:-3].replace("/", ".").removesuffix(".__init__") for p in SOURCE]
    # one process (torch is imported once): every module of the installed copy, then `python -m <pkg>.cli --help`
    script = (
        "import importlib, runpy, sys, warnings\n"
        f"site = {str(site.resolve())!r}\n"
        f"for name in {modules!r}:\n"
        "    m = importlib.import_module(name)\n"
        "    assert m.__file__.startswith(site), f'{name} imported from {m.__file__}, not the installed copy'\n"
        "print('imported', len(sys.modules), flush=True)\n"
        "sys.argv = ['yolo-prune', '--help']\n"
        "warnings.simplefilter('ignore', RuntimeWarning)  # runpy: the module is already imported\n"
        f"runpy.run_module('{PKG}.cli', run_name='__main__', alter_sys=True)\n"
    )
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "imported" in r.stdout, r.stderr[-3000:]
    assert "usage: yolo-prune" in r.stdout and "demo" in r.stdout, r.stdout[-3000:]
