"""Text from outside, shown and never obeyed.

Prompts, server messages, task ids, journal errors and file paths all reach the terminal. A
control character in one of them (ESC starting an ANSI sequence, a C1 control, DEL, a Unicode
bidi override that reverses what follows) could redraw the screen, forge a line, hide text or
plant a hyperlink; a ``[bold]`` or ``[link=...]`` could be taken as rich markup. So everything
the command line prints goes through :func:`printable` (it is the one place that escapes), and
everything given to rich is a :class:`~rich.text.Text` made by :func:`plain`, which rich never
parses for markup or emoji codes.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from rich.text import Text

__all__ = ["plain", "printable"]

#: C0 controls, DEL, C1 controls, the line and paragraph separators, and every bidi control
#: (marks, embeddings, overrides, isolates).
_UNSAFE: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control and bidi character written as an escape (``\\x1b``,
    ``\\u202e``); everything else, other scripts and emoji included, unchanged."""
    return _UNSAFE.sub(_escape, text)


def plain(text: str, style: str = "") -> Text:
    """``text`` escaped, as a rich ``Text``: printed as it is, never read as markup."""
    from rich.text import Text  # here: printable() must work without the [cli] extra

    return Text(printable(text), style=style)
