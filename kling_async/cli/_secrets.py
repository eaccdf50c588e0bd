"""Keeping keys out of everything the command line prints.

The SDK never puts a key in a message; this is the second line of defence for what the command
line itself handles: keys given with ``--api-key`` or the environment are replaced by ``***``
in anything written to stdout or stderr (argparse errors included), and an unrecognised
argument, which may be a key after a mistyped option, is never echoed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

__all__ = ["Redactor", "RedactingStream", "secrets_in", "scrub_unrecognized"]

_ENV_SECRETS = ("KLING_API_KEY", "KLING_SECRET_KEY", "KLING_ACCESS_KEY")
_MIN_SECRET = 4


def secrets_in(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """Every key the command line could see: ``--api-key`` values and the key variables."""
    found = [environ.get(name, "") for name in _ENV_SECRETS]
    for index, argument in enumerate(argv):
        if argument == "--api-key" and index + 1 < len(argv):
            found.append(argv[index + 1])
        elif argument.startswith("--api-key="):
            found.append(argument.partition("=")[2])
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


def scrub_unrecognized(message: str) -> str:
    """argparse's "unrecognized arguments: --api-kye sk-..." keeps only the option names."""
    prefix = "unrecognized arguments:"
    if not message.startswith(prefix):
        return message
    tokens = message[len(prefix) :].split()
    kept = [token.partition("=")[0] for token in tokens if token.startswith("-")]
    hidden = len(tokens) - len(kept)
    shown = " ".join(kept)
    if hidden:
        shown = f"{shown} (and {hidden} values, not shown)".strip()
    return f"{prefix} {shown}"
