"""The files a batch writes in its out directory: never through a link, never half-written.

An out directory may be shared, or prepared by someone else: a symbolic link planted at the
name of a file we write (or of its temporary file) must not redirect the write elsewhere. So:

* new content goes to a temporary file with a random name, created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` (it cannot exist yet, and a link there is an error), synced,
  then renamed over the target (a rename replaces a link, it never writes through it);
* lock files are opened with ``O_NOFOLLOW`` and must be regular files;
* a full disk is said as such (:func:`is_disk_full`, :func:`disk_full_message`), and the
  temporary file of a write that failed is removed.

The downloads' own temporary files are made the same way by the SDK (``O_EXCL``, random names).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import sqlite3
import stat
from pathlib import Path
from typing import Final

__all__ = [
    "PART_SUFFIX",
    "FileError",
    "check_not_link",
    "disk_full_message",
    "is_disk_full",
    "lock",
    "remove_stale_temporaries",
    "replace_file",
    "unlock",
]

_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)
_TEMPORARY: Final = re.compile(r"\..+\.[0-9a-f]{16}\.tmp")
#: How the temporary file of a download ends (``KlingClient.download`` streams a clip to
#: ``.NAME.<random>.part`` beside its target, then renames it): a killed batch may leave one.
PART_SUFFIX: Final = ".part"


class FileError(Exception):
    """A file of the batch cannot be used safely: a link at its name, not a regular file, or
    locked by another batch."""


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk or an exhausted quota."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, sqlite3.Error) and (
            getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            or "database or disk is full" in str(exc)
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_message(directory: Path) -> str:
    return f"no space left on the device holding {directory}"


def check_not_link(path: Path) -> None:
    """Raise :class:`FileError` if ``path`` is a symbolic link (dangling or not)."""
    if path.is_symlink():
        raise FileError(
            f"{path} is a symbolic link; refusing to write through it (remove it, or use "
            "another --out directory)"
        )


def _write(fd: int, data: bytes | memoryview) -> int:
    """One ``os.write``: the seam a test uses to make the disk full."""
    return os.write(fd, data)


def replace_file(path: Path, data: bytes) -> None:
    """Put ``data`` at ``path`` atomically: a random temporary file beside it, created
    exclusively without following links, synced, then renamed over ``path`` (a link at
    ``path`` is replaced, never followed). Nothing is left behind if any step fails."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
    fd = os.open(temporary, flags, 0o666)  # the umask applies, as for any file we make
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[_write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        replace_durably(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def replace_durably(temporary: Path, target: Path) -> None:
    """Rename into place, then sync the directory so the rename itself survives a crash."""
    os.replace(temporary, target)
    try:
        directory = os.open(target.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - a platform without directory handles (Windows)
        return
    try:
        os.fsync(directory)
    except OSError:  # pragma: no cover - some file systems refuse to sync a directory
        pass
    finally:
        os.close(directory)


def remove_stale_temporaries(directory: Path, name: str) -> None:
    """Delete the temporary files a killed :func:`replace_file` of ``name`` left (ours only:
    ``.NAME.<16 hex>.tmp``). Call it only while holding the batch's lock."""
    for path in directory.glob(f".{name}.*.tmp"):
        if _TEMPORARY.fullmatch(path.name):
            with contextlib.suppress(OSError):
                path.unlink()


def lock(path: Path, busy: str) -> int | None:
    """An exclusive lock on ``path`` (created, a regular file, never through a link), held
    until :func:`unlock`; :class:`FileError` saying ``busy`` if another process holds it.
    The operating system drops the lock when the process ends, however it ends."""
    try:
        import fcntl  # POSIX only: elsewhere the batch runs unlocked
    except ImportError:  # pragma: no cover - Windows
        return None
    check_not_link(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            check_not_link(path)
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileError(f"{path} is not a regular file; remove it, or use another --out")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise FileError(busy) from None
    return fd


def unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
