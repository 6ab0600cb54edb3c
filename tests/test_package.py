"""The package's shape: no import cycle (lazy imports included), large modules say why, YOLOv5 is not imported
by importing the package, and only the adapter patches YOLOv5."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "yolo_prune_plugin"
MODULES = sorted(p.stem for p in PKG.glob("*.py"))


def _imports(name: str) -> set[str]:
    """Package modules that ``name`` imports anywhere (module level or inside functions)."""
    tree = ast.parse((PKG / f"{name}.py").read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("yolo_prune_plugin."):
            out.add(node.module.split(".")[1])
    return {m for m in out if m in MODULES}


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


def test_no_import_cycle():
    graph = {m: _imports(m) - {m} for m in MODULES}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("name", MODULES)
def test_large_modules_say_why(name):
    text = (PKG / f"{name}.py").read_text(encoding="utf-8")
    if len(text.splitlines()) > 400:
        doc = ast.get_docstring(ast.parse(text)) or ""
        assert "(Over 400 lines:" in doc, f"{name}.py has {len(text.splitlines())} lines and no reason at its top"


def test_importing_the_package_does_not_import_yolov5():
    code = "import sys, yolo_prune_plugin, yolo_prune_plugin.cli; print(any(m.split('.')[0] in ('yolov5', 'models', 'utils') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(PKG.parent), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_only_the_adapter_patches_yolov5():
    """``setattr`` on modules/classes and ``m.__class__ =`` live in adapter.py alone."""
    offenders = []
    for name in MODULES:
        if name == "adapter":
            continue
        tree = ast.parse((PKG / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Attribute) and t.attr == "__class__":
                        offenders.append(f"{name}.py:{node.lineno} assigns __class__")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args:
                target = ast.unparse(node.args[0])
                if any(s in target for s in ("backend", "train", "general", "torch", "np", "yolo", "sys")):
                    offenders.append(f"{name}.py:{node.lineno} setattr({target}, ...)")
    assert not offenders, offenders
