"""The documentation cannot drift from the code: docs/configuration.md against ``PruneConfig`` and the CLI parsers,
configs/prune.yaml against ``PruneConfig``, README's set-up commands against .ci/run, and every relative link."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

from yolo_prune_plugin.cli import build_parser
from yolo_prune_plugin.config import DEFAULT_CONFIG_PATH, PruneConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DOC = ROOT / "docs" / "configuration.md"
README = ROOT / "README.md"
MAX_README_LINES = 220
NONE = "—"


def config_keys(obj: Any = None, prefix: str = "") -> dict[str, Any]:
    """Every key of ``PruneConfig`` (nested options dotted, e.g. ``obs.steps``) -> its default value."""
    obj = PruneConfig() if obj is None else obj
    out: dict[str, Any] = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if is_dataclass(v):
            out.update(config_keys(v, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = v
    return out


def yaml_value(v: Any) -> str:
    """A default as the doc writes it (YAML flow style)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(yaml_value(x) for x in v) + "]"
    return str(v)


def _section(text: str, heading: str) -> list[str]:
    """The lines under ``heading`` (a whole heading line) up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    out = []
    for line in lines[start + 1:]:
        m = re.match(r"(#+) ", line)
        if m and len(m.group(1)) <= level:
            break
        out.append(line)
    return out


def _rows(lines: list[str]) -> list[list[str]]:
    """Table body rows whose first cell is code (``| `x` | ...``), split into cells (``\\|`` is no separator)."""
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            for line in lines if line.startswith("| `")]


def _codes(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _key_rows() -> dict[str, list[str]]:
    rows = _rows(_section(CONFIG_DOC.read_text(encoding="utf-8"), "## Keys"))
    out: dict[str, list[str]] = {}
    for r in rows:
        key = _codes(r[0])[0]
        assert key not in out, f"docs/configuration.md: two rows for key `{key}`"
        out[key] = r
    return out


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _options(command: str) -> list[argparse.Action]:
    return [a for a in _subparsers()[command]._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def flag_key(command: str, action: argparse.Action) -> Optional[str]:
    """The config key a flag sets, from its ``dest`` (``prune_finetune_epochs`` -> ``finetune.epochs``), or None."""
    dest = action.dest
    if command == "train":
        if not dest.startswith("prune_"):
            return None
        dest = dest[len("prune_"):]
    from yolo_prune_plugin.cli import _TARGET_KEYS  # the budget flags: --target-drop -> target.max_drop, ...

    if dest.startswith("target_") and dest[len("target_"):] in _TARGET_KEYS:
        return f"target.{_TARGET_KEYS[dest[len('target_'):]]}"
    keys = config_keys()
    for candidate in (dest, dest.replace("_", ".", 1)):
        if candidate in keys:
            return candidate
    return None


def _flag_rows(command: str) -> dict[frozenset, list[str]]:
    rows = _rows(_section(CONFIG_DOC.read_text(encoding="utf-8"), f"### `yolo-prune {command}`"))
    return {frozenset(_codes(r[0])): r for r in rows}


def test_every_config_key_has_a_row_with_its_default():
    rows = _key_rows()
    for key, default in config_keys().items():
        want = yaml_value(default)
        assert key in rows, (f"docs/configuration.md ## Keys: no row for `{key}`; add one: "
                             f"| `{key}` | `{want}` | {NONE} | {NONE} | <meaning> |")
        assert rows[key][1] == f"`{want}`", (f"docs/configuration.md ## Keys, row `{key}`: default is `{want}` in "
                                            f"PruneConfig, the row says {rows[key][1]}")


def test_every_row_names_a_config_key():
    keys = config_keys()
    extra = [k for k in _key_rows() if k not in keys]
    assert not extra, f"docs/configuration.md ## Keys: rows for keys PruneConfig does not have: {extra}"


@pytest.mark.parametrize("command", ["train", "prune"])
def test_every_flag_has_a_row_naming_its_key(command):
    rows = _flag_rows(command)
    actions = _options(command)
    if command == "train":  # YOLOv5's own train.py flags are not ours to list
        assert {a.dest for a in actions} >= {"prune_amount", "prune_config"}
    for a in actions:
        flags = frozenset(a.option_strings)
        key = flag_key(command, a)
        want = f"`{key}`" if key else NONE
        shown = ", ".join(f"`{f}`" for f in a.option_strings)
        assert flags in rows, (f"docs/configuration.md ### `yolo-prune {command}`: no row for {shown}; add one: "
                               f"| {shown} | {want} | <meaning> |")
        assert rows[flags][1] == want, (f"docs/configuration.md ### `yolo-prune {command}`, row {shown}: the flag "
                                        f"sets {want}, the row says {rows[flags][1]}")
    known = {frozenset(a.option_strings) for a in actions}
    extra = [sorted(f) for f in rows if f not in known]
    assert not extra, f"docs/configuration.md ### `yolo-prune {command}`: rows for flags the parser lacks: {extra}"


@pytest.mark.parametrize("command,column", [("train", 2), ("prune", 3)])
def test_key_rows_name_the_flags_that_set_them(command, column):
    by_key: dict[str, set[str]] = {}
    for a in _options(command):
        key = flag_key(command, a)
        if key:
            by_key.setdefault(key, set()).update(a.option_strings)
    for key, row in _key_rows().items():
        want = by_key.get(key, set())
        got = set(_codes(row[column])) if row[column] != NONE else set()
        assert got == want, (f"docs/configuration.md ## Keys, row `{key}`: the `yolo-prune {command}` column says "
                             f"{sorted(got) or NONE}, the parser's flags for it are {sorted(want) or NONE}")


def _yaml_keys(data: dict, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in data.items():
        if isinstance(v, dict):
            out |= _yaml_keys(v, f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


def test_default_yaml_lists_every_key():
    """configs/prune.yaml "documents every key with its default" (test_config checks the values load equal)."""
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    keys = set(config_keys())
    got = _yaml_keys(data)
    assert not keys - got, f"configs/prune.yaml lacks {sorted(keys - got)}"
    assert not got - keys, f"configs/prune.yaml has keys PruneConfig does not: {sorted(got - keys)}"


def _ci_commands() -> tuple[str, str]:
    """README's two set-up commands as .ci/run runs them (its venv, install and test lines joined with &&)."""
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    steps = [ln for ln in lines if ln.startswith(("python3 -m venv", ". .venv/bin/activate", "pip install",
                                                  "python -m pytest"))]
    install = steps[:-1]
    assert len(install) >= 4 and steps[-1].startswith("python -m pytest"), steps
    return " && ".join(install + ["yolo-prune demo"]), " && ".join(steps)


def test_readme_setup_commands_are_what_ci_runs():
    text = README.read_text(encoding="utf-8").splitlines()
    for cmd in _ci_commands():
        assert cmd in text, f"README.md lacks the line `{cmd}` (.ci/run runs its steps)"


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}: move reference text to docs/)"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)}


DOCS = [README] + sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        assert dest.exists(), f"{doc.name}: link ({target}) points to a missing file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{doc.name}: link ({target}): no heading with that anchor"
