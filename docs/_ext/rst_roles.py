"""A griffe extension for the docs site: our docstrings' reST markup, read as Markdown.

The package's docstrings are written for ``help()`` and editors in a light reST style:
cross-reference roles (``:class:`KlingError```, ``:meth:`submit```) and ``::`` before an
indented code block. mkdocstrings renders docstrings as Markdown, where a role would show
as literal text, so before the docstrings are parsed this extension

- turns each role into a cross-reference: the name is resolved in the scope of the object
  whose docstring it is (as Sphinx does), and linked if the site renders its target; a
  target the reference does not render (a private helper, the standard library) is shown as
  plain code, with no warning. A leading ``~`` keeps only the last part of the name shown;
- turns a trailing ``::`` into ``:`` (the indented block after it is a Markdown code block);
- reads Sphinx's attribute comments: an attribute with no docstring takes the ``#:`` lines
  right above it (or a ``#:`` comment after it on its line) as its docstring.

Loaded by mkdocstrings (``extensions:`` in ``mkdocs.yml``); it changes nothing but what the
site shows.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(?P<role>class|meth|func|mod|attr|data|exc|obj|const):`(?P<text>[^`]+)`"
)
_LITERAL = re.compile(r"(?<=\S)::$", re.MULTILINE)
_EXPLICIT = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^>]+)>$")


def _resolve(obj: griffe.Object, name: str) -> str | None:
    """The full path ``name`` means in ``obj``'s scope, or None."""
    name = name.strip().removesuffix("()")
    first, _, rest = name.partition(".")
    scope: griffe.Object | None = obj
    while scope is not None:
        try:
            resolved = scope.resolve(first)
        except (griffe.NameResolutionError, griffe.AliasResolutionError, KeyError):
            scope = scope.parent
            continue
        return f"{resolved}.{rest}" if rest else resolved
    if first == "kling_async" or name.startswith("kling_async."):
        return name
    return None


def _convert(obj: griffe.Object, text: str) -> str:
    def role(match: re.Match[str]) -> str:
        text = match["text"]
        explicit = _EXPLICIT.match(text)
        if explicit:
            title, target = explicit["title"], explicit["target"]
        else:
            target = text
            title = text.lstrip("~")
            if text.startswith("~"):
                title = title.rsplit(".", 1)[-1]
        target = target.lstrip("~")
        shown = f"<code>{html.escape(title)}</code>"
        path = _resolve(obj, target)
        if path is None:
            return shown
        return f'<autoref identifier="{html.escape(path)}" optional>{shown}</autoref>'

    text = _ROLE.sub(role, text)
    return _LITERAL.sub(":", text)


def _comment_docstring(attr: griffe.Object) -> str | None:
    """The ``#:`` comment of an attribute, as Sphinx's autodoc reads it, or None."""
    if attr.lineno is None:
        return None
    try:
        lines = attr.lines_collection[attr.filepath]  # type: ignore[index]
    except (KeyError, TypeError):
        return None
    own = lines[attr.lineno - 1] if attr.lineno <= len(lines) else ""
    if "#:" in own:
        comment = own.split("#:", 1)[1].strip()
        return comment[:1].upper() + comment[1:] or None
    above: list[str] = []
    index = attr.lineno - 2
    while index >= 0 and lines[index].strip().startswith("#:"):
        above.append(lines[index].strip()[2:].strip())
        index -= 1
    return " ".join(reversed(above)) or None


class RstRoles(griffe.Extension):
    """Rewrites the roles and literal markers of every docstring of a loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.is_attribute and obj.docstring is None:
                comment = _comment_docstring(obj)
                if comment is not None:
                    obj.docstring = griffe.Docstring(comment, parent=obj)
            if obj.docstring is not None:
                obj.docstring.value = _convert(obj, obj.docstring.value)
            stack.extend(
                member  # type: ignore[misc]
                for member in obj.members.values()
                if not member.is_alias
            )
