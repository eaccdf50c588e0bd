"""The batch journal: one SQLite file that makes a batch safe to kill and rerun.

The protocol, and why each step is there:

1. Every row of the file is written (row key, request hash, ``external_task_id``, status
   ``pending``) in **one transaction, synced to disk, before the first POST**. The
   ``external_task_id`` is derived from the journal's random batch id and the row, so a rerun
   knows the id an earlier run may have used: a row that was POSTed but never heard back is
   looked up by that id instead of being created twice.
2. As soon as a job reports its ``task_id`` it is recorded; a rerun then simply follows the
   task. The record is a shortcut, not a safety net (step 1 is), so these updates are grouped
   into small transactions off the event loop.
3. Terminal states, result URLs, file names and SHA-256s are recorded as they happen: a rerun
   skips rows whose file is present with the recorded hash.

WAL mode with ``synchronous=FULL`` makes every commit durable when it returns while letting
``kling-async status`` read the journal of a running batch. A lock file next to the journal
keeps two batches from driving the same journal at once (the operating system drops the lock
when a process dies, even by ``kill -9``).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from ._naming import clip_name
from ._prompts import PromptRow

__all__ = [
    "JOURNAL_NAME",
    "STATUSES",
    "Journal",
    "JournalError",
    "JournalRow",
    "Preparation",
]

JOURNAL_NAME: Final = "kling-journal.sqlite3"
SCHEMA_VERSION: Final = "1"

#: pending: journaled, maybe POSTed (a rerun looks it up by external id before creating);
#: submitted / processing: the task exists (task_id known); succeeded: the task made its video,
#: not downloaded yet; done: the file is in place with its sha256; failed: the task failed;
#: rejected: the request was refused (policy, invalid) and will not be sent again.
STATUSES: Final = ("pending", "submitted", "processing", "succeeded", "done", "failed", "rejected")
TERMINAL: Final = frozenset({"done", "failed", "rejected"})

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    row_key TEXT PRIMARY KEY,
    number INTEGER NOT NULL,
    line INTEGER NOT NULL,
    request_hash TEXT NOT NULL,
    request_json TEXT NOT NULL,
    external_task_id TEXT NOT NULL UNIQUE,
    attempt INTEGER NOT NULL DEFAULT 1,
    task_id TEXT,
    status TEXT NOT NULL,
    video_id TEXT,
    video_url TEXT,
    file TEXT NOT NULL,
    sha256 TEXT,
    size INTEGER,
    error TEXT,
    submitted_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL
);
"""

#: Columns a run may update after the rows are written.
UPDATABLE: Final = frozenset(
    {
        "task_id",
        "status",
        "video_id",
        "video_url",
        "sha256",
        "size",
        "error",
        "submitted_at",
        "finished_at",
    }
)


class JournalError(Exception):
    """The journal cannot be used for this run (busy, foreign, newer schema, unreadable)."""


@attrs.frozen(kw_only=True)
class JournalRow:
    key: str
    number: int
    line: int
    request_hash: str
    request_json: str
    external_task_id: str
    attempt: int
    task_id: str | None
    status: str
    video_id: str | None
    video_url: str | None
    file: str
    sha256: str | None
    size: int | None
    error: str | None
    submitted_at: float | None
    finished_at: float | None

    @property
    def seconds(self) -> float | None:
        if self.submitted_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.submitted_at)


_COLUMNS: Final = (
    "row_key, number, line, request_hash, request_json, external_task_id, attempt, task_id, "
    "status, video_id, video_url, file, sha256, size, error, submitted_at, finished_at"
)


def _row(record: Sequence[Any]) -> JournalRow:
    (
        key,
        number,
        line,
        request_hash,
        request_json,
        external_task_id,
        attempt,
        task_id,
        status,
        video_id,
        video_url,
        file,
        sha256,
        size,
        error,
        submitted_at,
        finished_at,
    ) = record
    return JournalRow(
        key=key,
        number=number,
        line=line,
        request_hash=request_hash,
        request_json=request_json,
        external_task_id=external_task_id,
        attempt=attempt,
        task_id=task_id,
        status=status,
        video_id=video_id,
        video_url=video_url,
        file=file,
        sha256=sha256,
        size=size,
        error=error,
        submitted_at=submitted_at,
        finished_at=finished_at,
    )


@attrs.frozen
class Preparation:
    """What :meth:`Journal.prepare` found and did.

    ``rows``: the journal's view of every row of the file that can run (changed rows excluded);
    ``fresh``: keys written by this preparation and so certainly never POSTed;
    ``changed``: (file row, journal row) pairs whose request differs from the journal's;
    ``orphans``: journal rows the file no longer has.
    """

    rows: dict[str, JournalRow]
    fresh: frozenset[str]
    changed: tuple[tuple[PromptRow, JournalRow], ...]
    orphans: tuple[JournalRow, ...]


def _lock(path: Path) -> int | None:
    """An exclusive lock on ``path`` (created), or JournalError if another process holds it."""
    try:
        import fcntl  # POSIX only: elsewhere the journal runs unlocked
    except ImportError:  # pragma: no cover - Windows
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise JournalError(
            f"another kling-async batch is using {path.with_suffix('')} right now; "
            "wait for it to finish or stop it first"
        ) from None
    return fd


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA busy_timeout=10000")
    mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        connection.close()
        raise JournalError(f"{path}: SQLite refused WAL mode (got {mode})")
    connection.execute("PRAGMA synchronous=FULL")
    connection.executescript(_SCHEMA)
    return connection


class Journal:
    """One batch's journal. Methods are synchronous and short; callers on an event loop run
    :meth:`apply` in a worker thread (the connection allows that, and only one call runs at a
    time)."""

    def __init__(self, path: Path, connection: sqlite3.Connection, lock_fd: int | None) -> None:
        self.path = path
        self._db = connection
        self._lock_fd = lock_fd
        self.meta: dict[str, str] = dict(self._db.execute("SELECT key, value FROM meta"))
        version = self.meta.get("schema", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            self.close()
            raise JournalError(
                f"{path} was written by another version of kling-async (schema {version}); "
                "use that version, or another --out directory"
            )

    @classmethod
    def open(cls, path: Path, *, lock: bool = True) -> Journal:
        """Open (creating if needed) with WAL and full sync; ``lock`` for a run that writes."""
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(path.with_name(path.name + ".lock")) if lock else None
        try:
            connection = _connect(path)
        except sqlite3.DatabaseError as exc:
            if lock_fd is not None:
                os.close(lock_fd)
            raise JournalError(f"{path} is not a usable journal: {exc}") from None
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return cls(path, connection, lock_fd)

    def close(self) -> None:
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def batch_id(self) -> str | None:
        return self.meta.get("batch_id")

    def rows(self) -> dict[str, JournalRow]:
        """Every row, in file order."""
        cursor = self._db.execute(f"SELECT {_COLUMNS} FROM rows ORDER BY number")  # noqa: S608
        return {record[0]: _row(record) for record in cursor}

    # --- before any POST ----------------------------------------------------------------------

    def prepare(
        self,
        rows: Sequence[PromptRow],
        *,
        backend: str,
        prompts: str,
        restart: Callable[[JournalRow], bool] | None = None,
    ) -> Preparation:
        """Reconcile the file with the journal in one durable transaction, before any POST.

        New rows are written ``pending`` with their ``external_task_id``. Rows for which
        ``restart`` says so start over as a new attempt, with a new external id so that the
        old task can never be adopted by mistake: failed rows with ``--retry-failed``, and the
        unfinished rows of an in-process emulator that is gone with its tasks. Raises
        :class:`JournalError` if the journal belongs to another backend.
        """
        known_backend = self.meta.get("backend")
        if known_backend is not None and known_backend != backend:
            raise JournalError(
                f"{self.path} belongs to a batch run against {known_backend}, not {backend}: "
                "its tasks cannot be followed from here; use another --out directory"
            )
        existing = self.rows()
        now = time.time()
        batch_id = self.batch_id or secrets.token_hex(6)
        total = max([row.number for row in rows] + [row.number for row in existing.values()])
        fresh: set[str] = set()
        changed: list[tuple[PromptRow, JournalRow]] = []
        inserts: list[tuple[Any, ...]] = []
        restarts: list[tuple[str, int, str]] = []
        for row in rows:
            known = existing.get(row.key)
            if known is None:
                own = row.request.external_task_id
                external = own if own is not None else f"kb-{batch_id}-{row.number}"
                name = clip_name(row.number, row.request.prompt, total)
                inserts.append(
                    (
                        row.key,
                        row.number,
                        row.line,
                        row.request_hash,
                        row.request_json,
                        external,
                        name,
                        now,
                    )
                )
                fresh.add(row.key)
            elif known.request_hash != row.request_hash:
                changed.append((row, known))
            elif restart is not None and restart(known):
                attempt = known.attempt + 1
                base = known.external_task_id.rsplit("-a", 1)[0] if known.attempt > 1 else None
                restarts.append(
                    (known.key, attempt, f"{base or known.external_task_id}-a{attempt}")
                )
                fresh.add(known.key)
        file_keys = {row.key for row in rows}
        orphans = tuple(row for key, row in existing.items() if key not in file_keys)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if self.batch_id is None:
                db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [
                        ("schema", SCHEMA_VERSION),
                        ("batch_id", batch_id),
                        ("backend", backend),
                        ("created_at", str(now)),
                    ],
                )
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('prompts', ?)", (prompts,))
            db.executemany(
                "INSERT INTO rows (row_key, number, line, request_hash, request_json, "
                "external_task_id, file, status, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                inserts,
            )
            db.executemany(
                "UPDATE rows SET attempt = ?, external_task_id = ?, status = 'pending', "
                "task_id = NULL, video_id = NULL, video_url = NULL, sha256 = NULL, "
                "size = NULL, error = NULL, submitted_at = NULL, finished_at = NULL, "
                "updated_at = ? WHERE row_key = ?",
                [(attempt, external, now, key) for key, attempt, external in restarts],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.meta = dict(db.execute("SELECT key, value FROM meta"))
        current = self.rows()
        changed_keys = {row.key for row, _ in changed}
        runnable = {row.key: current[row.key] for row in rows if row.key not in changed_keys}
        return Preparation(
            rows=runnable, fresh=frozenset(fresh), changed=tuple(changed), orphans=orphans
        )

    # --- during the run -----------------------------------------------------------------------

    def apply(self, updates: Mapping[str, Mapping[str, object]]) -> None:
        """Write many rows' changes in one transaction (key -> column -> value)."""
        if not updates:
            return
        unknown = {column for changes in updates.values() for column in changes} - UPDATABLE
        if unknown:
            raise ValueError(f"not updatable journal columns: {sorted(unknown)}")
        now = time.time()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for key, changes in updates.items():
                columns = sorted(changes)
                assignments = ", ".join(f"{column} = ?" for column in columns)
                db.execute(
                    f"UPDATE rows SET {assignments}, updated_at = ? WHERE row_key = ?",  # noqa: S608
                    (*(changes[column] for column in columns), now, key),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def existing_rows(path: Path) -> tuple[dict[str, str], dict[str, JournalRow]] | None:
    """The meta and rows of a journal, for reading only (``status``, ``--dry-run``), or None
    if there is no journal at ``path``. Never creates one."""
    if not path.is_file():
        return None
    journal = Journal.open(path, lock=False)
    try:
        return dict(journal.meta), journal.rows()
    finally:
        journal.close()


def journal_path(out: Path, journal: Path | None) -> Path:
    return journal if journal is not None else out / JOURNAL_NAME
