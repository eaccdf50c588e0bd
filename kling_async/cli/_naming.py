"""Names for downloaded clips: ours, never the server's.

A file name taken from a URL or a server answer could traverse directories, collide, or be
anything at all. Ours are the row number (zero-padded, so a directory listing sorts like the
prompt file when its row was first journaled) and a short ASCII slug of the prompt, so a
person can tell the clips apart. A name is given once and never reused: if an earlier row of
the journal has it, a ``-2``, ``-3``... is added (:func:`unique_name`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection

__all__ = ["clip_name", "slug", "unique_name"]

_NOT_WORD = re.compile(r"[^a-z0-9]+")


def slug(text: str, limit: int = 40) -> str:
    """Lower-case ASCII words joined by ``-``, cut at a word boundary; ``clip`` if none."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    words = [word for word in _NOT_WORD.split(ascii_text.lower()) if word]
    result = ""
    for word in words:
        candidate = f"{result}-{word}" if result else word
        if len(candidate) > limit:
            if not result:
                result = word[:limit]
            break
        result = candidate
    return result or "clip"


def clip_name(number: int, prompt: str, total: int) -> str:
    """``007-a-red-fox-running-through-snow.mp4`` for row 7 of a file of up to 999 rows."""
    width = max(3, len(str(total)))
    return f"{number:0{width}d}-{slug(prompt)}.mp4"


def unique_name(name: str, taken: Collection[str]) -> str:
    """``name``, or ``stem-2.mp4``, ``stem-3.mp4``... for the first that is not ``taken``."""
    if name not in taken:
        return name
    stem, dot, suffix = name.rpartition(".")
    number = 2
    while f"{stem}-{number}{dot}{suffix}" in taken:
        number += 1
    return f"{stem}-{number}{dot}{suffix}"
