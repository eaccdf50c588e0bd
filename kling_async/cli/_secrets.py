"""Keeping keys out of everything the command line prints.

The SDK never puts a key in a message; this is the second line of defence for what the command
line itself handles: keys given with ``--api-key`` or the environment are replaced by ``***``
in anything written to stdout or stderr (argparse errors included), and so is the password
of a Redis URL (``--redis``, ``$KLING_REDIS_URL``), which the command itself only ever shows
without its user info and query; no argparse error
echoes a value: an unrecognised argument may be a key after a mistyped option (``--api-kye KEY``)
or glued to one (``-aKEY``), and an invalid value may be a key given to the wrong option
(``--mode KEY``), so :func:`scrub_argparse` keeps option names and our own rules only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = [
    "RedactingStream",
    "Redactor",
    "scrub_argparse",
    "scrub_unrecognized",
    "secrets_in",
    "url_secrets",
]

_ENV_SECRETS = ("KLING_API_KEY", "KLING_SECRET_KEY", "KLING_ACCESS_KEY")
_ENV_URLS = ("KLING_REDIS_URL",)
_MIN_SECRET = 4
#: What an option name looks like: letters and single dashes, no digits (keys have them).
_LONG_OPTION = re.compile(r"--[A-Za-z]+(?:-[A-Za-z]+)*")
_SHORT_OPTION = re.compile(r"-[A-Za-z]")
_ARGUMENT = re.compile(r"argument (?P<name>[^:]{1,80}): (?P<rest>.*)", re.DOTALL)


def url_secrets(url: str) -> list[str]:
    """The password of a URL (as written and decoded), from its user info or its query
    (redis-py reads ``?password=`` too); a URL that cannot be parsed is a secret whole."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return [url]
    found = []
    if parts.password:
        found += [parts.password, unquote(parts.password)]
    for name, values in parse_qs(parts.query).items():
        if name.lower() == "password":
            found += values
    return found


def secrets_in(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """Every key the command line could see: ``--api-key`` values and the key variables, and
    the passwords of ``--redis`` and ``$KLING_REDIS_URL``."""
    found = [environ.get(name, "") for name in _ENV_SECRETS]
    for name in _ENV_URLS:
        found += url_secrets(environ.get(name, ""))
    for index, argument in enumerate(argv):
        if argument == "--api-key" and index + 1 < len(argv):
            found.append(argv[index + 1])
        elif argument.startswith("--api-key="):
            found.append(argument.partition("=")[2])
        elif argument == "--redis" and index + 1 < len(argv):
            found += url_secrets(argv[index + 1])
        elif argument.startswith("--redis="):
            found += url_secrets(argument.partition("=")[2])
    return [secret.strip() for secret in found if len(secret.strip()) >= _MIN_SECRET]


class Redactor:
    def __init__(self, secrets: Iterable[str]) -> None:
        unique = {secret for secret in secrets if len(secret) >= _MIN_SECRET}
        self._pattern = (
            re.compile("|".join(re.escape(s) for s in sorted(unique, key=len, reverse=True)))
            if unique
            else None
        )

    def __call__(self, text: str) -> str:
        return text if self._pattern is None else self._pattern.sub("***", text)


class RedactingStream:
    """A text stream wrapper that redacts every write; everything else is passed through, so
    rich still sees a terminal when there is one."""

    def __init__(self, stream: TextIO, redact: Redactor) -> None:
        self._stream = stream
        self._redact = redact

    def write(self, text: str) -> int:
        self._stream.write(self._redact(text))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _option_name(token: str) -> str | None:
    """The option name of an argument, if it is plainly one (``--api-kye``, ``-x``); None for
    anything that may carry a value (``-aKEY``, ``--api-kyeKEY``, a bare value)."""
    name = token.partition("=")[0] if token.startswith("--") else token
    if _LONG_OPTION.fullmatch(name) and len(name) <= 32:
        return name
    return name if _SHORT_OPTION.fullmatch(name) else None


def scrub_unrecognized(message: str) -> str:
    """argparse's "unrecognized arguments: --api-kye sk-..." keeps only the option names."""
    prefix = "unrecognized arguments:"
    if not message.startswith(prefix):
        return message
    tokens = message[len(prefix) :].split()
    kept = [name for name in map(_option_name, tokens) if name is not None]
    hidden = len(tokens) - len(kept)
    shown = " ".join(kept)
    if hidden:
        shown = f"{shown} (and {hidden} more, not shown: they may be keys)".strip()
    return f"{prefix} {shown}"


def scrub_argparse(message: str) -> str:
    """Any argparse error message, with every value taken out: option names, the choices and
    our own rules (the ``must be ...`` of our argument types, which never quote the value)."""
    if message.startswith("unrecognized arguments:"):
        return scrub_unrecognized(message)
    if message.startswith("the following arguments are required:"):
        return message  # names only
    match = _ARGUMENT.fullmatch(message)
    if match is None:
        return "invalid arguments (not shown: they may hold keys)"
    name, rest = match["name"], match["rest"]
    if rest.startswith("invalid choice:") and "(choose from " in rest:
        rule = "invalid choice (choose from " + rest.rpartition("(choose from ")[2]
    elif rest.startswith("ignored explicit argument"):
        rule = "takes no value"
    elif rest.startswith(("expected ", "must be ", "not allowed with argument ")):
        rule = rest
    else:
        rule = "invalid value (not shown)"
    return f"argument {name}: {rule}"
