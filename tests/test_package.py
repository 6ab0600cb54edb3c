"""The package's shape: folders by job, no import cycle (lazy imports included), no upward import, no module over
450 lines, YOLOv5 not imported by importing the package, and only ``backend/`` patches YOLOv5."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "yolo_prune_plugin"
#: dotted module name (below the package) -> file, e.g. "backend.loading" -> .../backend/loading.py
FILES = {".".join(p.relative_to(PKG).with_suffix("").parts): p for p in sorted(PKG.rglob("*.py"))}
MODULES = sorted(FILES)

#: the layers, lowest first: a module may import its own layer and the layers below it, never one above.
#: docs/design.md draws the same order.
LAYERS = [
    {"_version", "errors", "utils"},
    {"backend"},
    {"prune"},
    {"config", "options", "report"},
    {"training"},
    {"tools"},
    {"stages"},
    {"pipeline"},
    {"callbacks"},
    {"api"},
    {"cli", "demo", "__init__"},
]
SUBPACKAGES = {"backend", "prune", "training", "tools", "utils"}
MAX_LINES = 450


def _layer(module: str) -> int:
    head = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"{module}: no layer in test_package.LAYERS (add the new module or folder there)")


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """Package modules an ``ImportFrom`` in ``module`` names (relative or absolute)."""
    if node.level:
        package = list(FILES[module].relative_to(PKG).parent.parts)
        base = package[:len(package) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    elif (node.module or "").split(".")[0] == "yolo_prune_plugin":
        target = ".".join(node.module.split(".")[1:])
    else:
        return []
    out = []
    for a in node.names:  # `from .backend import loading` names a module; `from .backend.loading import x` a name
        sub = f"{target}.{a.name}" if target else a.name
        out.append(sub if sub in FILES or f"{sub}.__init__" in FILES else target)
    return [m if m in FILES else f"{m}.__init__" for m in out if m]


def _imports(name: str) -> set[str]:
    """Package modules that ``name`` imports anywhere (module level or inside functions)."""
    tree = ast.parse(FILES[name].read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out.update(_resolve(name, node))
    return {m for m in out if m in FILES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in graph:
        if n not in state and (c := visit(n)):
            return c
    return None


def test_the_import_resolver_sees_relative_and_absolute_imports():
    graph = {m: _imports(m) for m in MODULES}
    assert "backend.loading" in graph["prune.calibration"]
    assert "training.finetune" in graph["stages"] and "stages" in graph["pipeline"]
    assert {"backend.loading", "prune.unstructured"} <= graph["tools.sweep"]


def test_no_import_cycle():
    graph = {m: _imports(m) - {m} for m in MODULES}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_upward_import():
    upward = [f"{m} (layer {_layer(m)}) imports {i} (layer {_layer(i)})"
              for m in MODULES for i in sorted(_imports(m)) if _layer(i) > _layer(m)]
    assert not upward, upward


def test_folders_are_the_documented_subpackages():
    found = {p.parent.name for p in PKG.rglob("__init__.py") if p.parent != PKG}
    assert found == SUBPACKAGES
    design = (PKG.parent / "docs" / "design.md").read_text(encoding="utf-8")
    for sub in sorted(SUBPACKAGES):  # the folder map names every subpackage and every module in it
        assert f"`{sub}/`" in design, f"docs/design.md does not name {sub}/"
        for f in sorted((PKG / sub).glob("*.py")):
            if f.name != "__init__.py":
                assert f"`{f.name}`" in design, f"docs/design.md's folder map lacks {sub}/{f.name}"


@pytest.mark.parametrize("name", MODULES)
def test_no_module_over_450_lines(name):
    n = len(FILES[name].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{FILES[name].relative_to(PKG.parent)} has {n} lines: split it by job"


def test_importing_the_package_does_not_import_yolov5():
    code = "import sys, yolo_prune_plugin, yolo_prune_plugin.cli; print(any(m.split('.')[0] in ('yolov5', 'models', 'utils') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(PKG.parent), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_only_the_backend_patches_yolov5():
    """``setattr`` on modules/classes and ``m.__class__ =`` live in ``backend/`` alone."""
    offenders = []
    for name in MODULES:
        if name.startswith("backend."):
            continue
        tree = ast.parse(FILES[name].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Attribute) and t.attr == "__class__":
                        offenders.append(f"{name}:{node.lineno} assigns __class__")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args:
                target = ast.unparse(node.args[0])
                if any(s in target for s in ("backend", "train", "general", "torch", "np", "yolo", "sys")):
                    offenders.append(f"{name}:{node.lineno} setattr({target}, ...)")
    assert not offenders, offenders


TESTS = PKG.parent / "tests"
#: modules whose behaviour is all in other modules' tests (nothing of their own to run)
NO_TEST_FILE = {"_version"}


def _test_files_for(module: str) -> list[Path]:
    """``tests/<folder>/test_<name>.py`` and ``test_<name>_<aspect>.py``: the tests of ``<folder>/<name>.py``."""
    *folders, leaf = module.split(".")
    where = TESTS.joinpath(*folders)
    return sorted(where.glob(f"test_{leaf}.py")) + sorted(where.glob(f"test_{leaf}_*.py"))


def _imports_module(test_file: Path, module: str) -> bool:
    """Whether ``test_file`` imports ``yolo_prune_plugin.<module>`` (``import``, ``from .. import <module>`` or a
    name from it), at module level or inside a test."""
    dotted = f"yolo_prune_plugin.{module}"
    parent, _, leaf = dotted.rpartition(".")
    for node in ast.walk(ast.parse(test_file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import) and any(a.name == dotted for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and not node.level:
            if node.module == dotted or (node.module == parent and any(a.name == leaf for a in node.names)):
                return True
    return False


@pytest.mark.parametrize("name", [m for m in MODULES if not m.endswith("__init__") and m not in NO_TEST_FILE])
def test_every_module_has_a_test_file_that_imports_it(name):
    """tests/ mirrors the package: ``backend/loading.py`` is tested in ``tests/backend/test_loading*.py``."""
    files = _test_files_for(name)
    want = TESTS.joinpath(*name.split(".")[:-1], f"test_{name.split('.')[-1]}.py").relative_to(PKG.parent)
    assert files, f"{name.replace('.', '/')}.py has no test file ({want})"
    assert any(_imports_module(f, name) for f in files), \
        f"none of {[str(f.relative_to(TESTS)) for f in files]} imports yolo_prune_plugin.{name}"


@pytest.mark.parametrize("folder", sorted(SUBPACKAGES))
def test_every_test_file_is_named_after_a_module(folder):
    """The other direction: each ``tests/<folder>/test_<x>.py`` tests a module ``<folder>/<x>.py`` (or an aspect
    of one, ``test_<module>_<aspect>.py``); no test file is left named after a module that no longer exists."""
    modules = {m.split(".")[-1] for m in MODULES if m.startswith(f"{folder}.")}
    stray = [f.name for f in sorted((TESTS / folder).glob("test_*.py"))
             if not any(f.stem == f"test_{m}" or f.stem.startswith(f"test_{m}_") for m in modules)]
    assert not stray, f"tests/{folder}/ has test files named after no module of {folder}/: {stray}"


def test_top_level_test_files_are_named_after_a_module_or_the_project():
    """Top-level test files test a top-level module (``test_cli.py``), or the project as a whole: its package
    shape, its documents, its wheel, its scripts (``PROJECT_TESTS``); whole trainings live in ``tests/e2e/``."""
    project_tests = {"test_package", "test_docs", "test_wheel", "test_check_gpu_script"}
    modules = {m for m in MODULES if "." not in m}
    stray = [f.name for f in sorted(TESTS.glob("test_*.py")) if f.stem not in project_tests
             and not any(f.stem == f"test_{m}" or f.stem.startswith(f"test_{m}_") for m in modules)]
    assert not stray, f"top-level test files named after no top-level module: {stray}"
