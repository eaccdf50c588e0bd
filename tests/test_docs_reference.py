"""The reference (docs/reference/) cannot fall behind the public API.

Each public module's ``__all__`` is the list of names the reference must render: every one has
its own ``::: module.name`` directive (mkdocstrings renders it from its docstring), nothing
else is rendered, and the error page's tree is the real class hierarchy. ``mkdocs build
--strict`` (``nox -s docs``) then fails on a directive that does not resolve.
"""

from __future__ import annotations

import builtins
import importlib
import re
from pathlib import Path

import pytest

import kling_async as ka

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference"
MODULES = ("kling_async", "kling_async.testing", "kling_async.fastapi", "kling_async.redis")

_DIRECTIVE = re.compile(r"^:::\s+(?P<path>[\w.]+)\s*$", re.MULTILINE)
_TREE_ITEM = re.compile(r"^(?P<indent> *)- (?:\[`(?P<linked>\w+)`\]\([^)]*\)|`(?P<plain>\w+)`)")


#: What renders nothing of a ``:::`` line in it: an HTML comment, a fenced code block.
_UNRENDERED = re.compile(r"<!--.*?-->|^[ \t]*(`{3,}|~{3,}).*?^[ \t]*\1[ \t]*$", re.S | re.M)


def directives() -> list[tuple[Path, str]]:
    """Every ``::: path`` the reference pages render, with its page (one commented out or
    shown in a code block renders nothing, so it is not counted)."""
    found = []
    for page in sorted(REFERENCE.glob("*.md")):
        text = _UNRENDERED.sub("", page.read_text("utf-8"))
        found += [(page, m["path"]) for m in _DIRECTIVE.finditer(text)]
    return found


def public_names() -> list[str]:
    names = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        names += [f"{module_name}.{name}" for name in module.__all__]
    return names


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_is_in_the_reference(module_name: str) -> None:
    module = importlib.import_module(module_name)
    rendered = {path for _, path in directives()}
    missing = [name for name in module.__all__ if f"{module_name}.{name}" not in rendered]
    assert not missing, f"add `::: {module_name}.NAME` to a page of docs/reference/: {missing}"


def test_the_reference_renders_only_public_names_once_each() -> None:
    paths = [path for _, path in directives()]
    public = set(public_names())
    assert sorted(set(paths) - public) == [], "the reference renders names that are not public"
    duplicates = sorted({path for path in paths if paths.count(path) > 1})
    assert duplicates == [], "a name rendered twice makes two anchors of the same id"


def test_reference_pages_are_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text("utf-8")
    for page in REFERENCE.glob("*.md"):
        assert f"reference/{page.name}" in nav, page.name


def _tree() -> list[tuple[str, str | None]]:
    """(class name, parent name) of each item of the error page's tree."""
    text = (REFERENCE / "errors.md").read_text("utf-8")
    items: list[tuple[str, str | None]] = []
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        match = _TREE_ITEM.match(line)
        if match is None:
            continue
        depth = len(match["indent"])
        name = match["linked"] or match["plain"]
        while stack and stack[-1][0] >= depth:
            stack.pop()
        items.append((name, stack[-1][1] if stack else None))
        stack.append((depth, name))
    return items


def _class(name: str) -> type:
    found = getattr(ka, name, None) or getattr(builtins, name)
    assert isinstance(found, type), name
    return found


def test_the_error_tree_is_the_class_hierarchy() -> None:
    tree = _tree()
    drawn = {name for name, _ in tree}
    public_errors = {
        name
        for name in ka.__all__
        if isinstance(getattr(ka, name), type) and issubclass(getattr(ka, name), BaseException)
    }
    assert public_errors - drawn == set(), "every public exception and warning is in the tree"
    for name, parent in tree:
        if parent is not None:
            assert _class(parent) in _class(name).__bases__, f"{name} is drawn under {parent}"
    roots = [name for name, parent in tree if parent is None]
    assert roots == ["KlingError", "UserWarning"]
