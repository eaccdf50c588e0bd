"""The package logger, ``logging.getLogger("kling_async")``, and ``KLING_LOG``.

A library must not configure logging for its users: the logger gets a :class:`NullHandler`, so
nothing is printed (and Python's "last resort" handler does not print warnings) unless the
application configures logging. For a quick look without touching code, ``KLING_LOG=debug``
or ``KLING_LOG=info`` (read once, when ``kling_async`` is imported, like ``OPENAI_LOG`` in the
openai SDK) attaches a readable stderr handler at that level. Any other value is ignored, with
one warning saying which values work.

What is logged: at DEBUG, one line per HTTP attempt (method, path without query values,
status, request id, elapsed milliseconds, attempt number; result files by URL without their
signed query); at INFO, how each ambiguous create was resolved and what the client did about a
rejected token; at WARNING, what a user should know (an ambiguous outcome, a possible
duplicate). Never a key, secret, token or signed URL: every message that carries server text
passes the client's redactor.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["ENV_VAR", "LOGGER_NAME", "configure_from_env", "logger"]

LOGGER_NAME = "kling_async"
ENV_VAR = "KLING_LOG"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO}
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logger = logging.getLogger(LOGGER_NAME)
logger.addHandler(logging.NullHandler())


class _EnvHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``KLING_LOG`` attaches (a class of its own, so it is attached only once)."""


def configure_from_env(value: str | None = None) -> logging.Handler | None:
    """Attach a stderr handler at the level ``KLING_LOG`` names (``value``: the variable's
    value, read from the environment when None); the handler, or None if none was attached.

    Runs once at import. An unset or empty variable does nothing; an unknown value warns once
    and does nothing (a typo must not turn logging on or off silently).
    """
    if value is None:
        value = os.environ.get(ENV_VAR, "")
    name = value.strip().lower()
    if not name:
        return None
    level = _LEVELS.get(name)
    if level is None:
        warnings.warn(
            f"{ENV_VAR}={value!r} is ignored: use {ENV_VAR}=debug or {ENV_VAR}=info",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    for handler in logger.handlers:
        if isinstance(handler, _EnvHandler):
            handler.setLevel(level)
            logger.setLevel(level)
            return handler
    handler = _EnvHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


configure_from_env()
