"""Lines for a person on stderr: errors always, notes and warnings unless ``--quiet``.

stdout is for the live view, the final table and the last line (or, with ``--json``, for
JSON lines only), so everything else a run has to say goes to stderr, escaped, since most of
it holds text from outside (paths, values, server messages). ``--quiet`` keeps errors and the
last line; :func:`quiet` says so for the duration of one command (a context variable, so a
``main`` called inside a larger program leaves nothing behind).
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from ._display import printable

__all__ = ["is_quiet", "quiet", "say", "tell"]

_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "kling_async_cli_quiet", default=False
)


def say(text: str) -> None:
    """An error (or the last line, when it goes to stderr): always said, on stderr."""
    lines = text.rstrip("\n").split("\n")
    sys.stderr.write("".join(printable(line) + "\n" for line in lines))
    sys.stderr.flush()


def tell(text: str) -> None:
    """A note or a warning, on stderr; nothing with ``--quiet``."""
    if not _QUIET.get():
        say(text)


def is_quiet() -> bool:
    return _QUIET.get()


@contextmanager
def quiet(enabled: bool) -> Iterator[None]:
    token = _QUIET.set(enabled)
    try:
        yield
    finally:
        _QUIET.reset(token)
