"""``SQLiteJobStore``: the job store in one SQLite file, for a client that must survive a restart.

Why it is built the way it is:

* **Durable on return.** ``save`` commits one transaction per call in WAL mode with
  ``synchronous=FULL``: in WAL mode ``NORMAL`` may lose the last commits on a power cut, and
  the engine's "about to send a create" record is exactly the write that must not be lost
  (a resumed job whose record says ``sent`` is looked up before anything is re-sent). WAL
  lets readers (``kling-async status``, a dashboard) read while a client writes.
* **Off the event loop.** Every call to SQLite runs in a worker thread
  (``anyio.to_thread.run_sync``); one ``threading.Lock`` keeps the one connection to one call
  at a time, so a poller never waits on a disk sync and the connection is never used by two
  threads at once.
* **One converter.** Requests and task snapshots are kept as the JSON of their public
  ``to_dict()`` and read back with ``from_dict()``: the converter that owns every wire name
  owns these too, so the file never grows a second encoding of a task.
* **Other owners of the file.** The tables are named ``kling_jobs`` and ``kling_jobs_meta``
  so the file can hold an application's own tables beside them (the batch tool's journal
  keeps its rows in the same file). Columns and JSON keys a later version adds are ignored
  when read and left alone when written; a file whose ``kling_jobs_meta.schema`` is newer than
  this version understands is refused with :class:`JobStoreError`, before anything is written.
* **No secrets.** A request holds no key, and a task's status message is redacted before it
  reaches a job, so nothing written here is a credential.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import anyio.to_thread

from kling_async._errors import JobStoreError, UsageError
from kling_async.engine.store import JobRecord, stored_request, stored_status
from kling_async.protocol.models import Task
from kling_async.protocol.schedule import ClassKey, DurationSummary

__all__ = ["SCHEMA_VERSION", "SQLiteJobStore"]

#: The layout version of the tables, bumped only when an older version could no longer read
#: or write them safely (added columns and JSON keys do not bump it).
SCHEMA_VERSION: Final = 1

T = TypeVar("T")

log = logging.getLogger("kling_async")

_TABLES: Final = """
CREATE TABLE IF NOT EXISTS kling_jobs_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS kling_jobs (
    id TEXT PRIMARY KEY,
    request TEXT,
    task_id TEXT,
    status TEXT NOT NULL,
    task TEXT,
    sent INTEGER NOT NULL DEFAULT 0,
    possible_duplicate INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    error_type TEXT,
    created_at REAL NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS kling_jobs_task_id ON kling_jobs (task_id);
"""
#: Learned durations, one row per class (model, mode, clip length). Added after layout 1 was
#: first written, so it is created in any file that lacks it (an older journal gains it).
#: ``WITHOUT ROWID``: the key is the table, one page for a handful of classes (no index page
#: beside it), so a journal on a nearly full disk pays little for it.
_DURATIONS: Final = """
CREATE TABLE IF NOT EXISTS kling_durations (
    model TEXT NOT NULL,
    mode TEXT NOT NULL,
    duration TEXT NOT NULL,
    summary TEXT NOT NULL,
    PRIMARY KEY (model, mode, duration)
) WITHOUT ROWID
"""
_SAVE_DURATION: Final = (
    "INSERT INTO kling_durations (model, mode, duration, summary) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (model, mode, duration) DO UPDATE SET summary = excluded.summary"
)

_COLUMNS: Final = (
    "id",
    "request",
    "task_id",
    "status",
    "task",
    "sent",
    "possible_duplicate",
    "error",
    "error_type",
    "created_at",
    "updated_at",
)
_SELECT: Final = f"SELECT {', '.join(_COLUMNS)} FROM kling_jobs ORDER BY rowid"  # noqa: S608
# An upsert, not INSERT OR REPLACE: a replace deletes the row first, which would reset the
# columns a later version added (and that this version does not know) to their defaults.
_UPSERT: Final = (
    f"INSERT INTO kling_jobs ({', '.join(_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' for _ in _COLUMNS)}) "
    "ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{column} = excluded.{column}" for column in _COLUMNS[1:])
)


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _encode(record: JobRecord) -> tuple[Any, ...]:
    return (
        record.id,
        None if record.request is None else _dumps(record.request.to_dict()),
        record.task_id,
        record.status.value,
        None if record.task is None else _dumps(record.task.to_dict()),
        int(record.sent),
        int(record.possible_duplicate),
        record.error,
        record.error_type,
        float(record.created_at),
        float(record.updated_at),
    )


def _decode(path: Path, row: Sequence[Any]) -> JobRecord:
    (
        id_,
        request,
        task_id,
        status,
        task,
        sent,
        possible_duplicate,
        error,
        error_type,
        created_at,
        updated_at,
    ) = row
    try:
        return JobRecord(
            id=id_,
            request=None if request is None else stored_request(json.loads(request)),
            task_id=task_id,
            status=stored_status(status),
            task=None if task is None else Task.from_dict(json.loads(task)),
            sent=bool(sent),
            possible_duplicate=bool(possible_duplicate),
            error=error,
            error_type=error_type,
            created_at=float(created_at or 0.0),
            updated_at=float(updated_at or 0.0),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise JobStoreError(
            f"{path}: the record of job {id_!r} cannot be read ({type(exc).__name__}: {exc})"
        ) from None


def _write(db: sqlite3.Connection, rows: list[tuple[Any, ...]], statement: str = _UPSERT) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany(statement, rows)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # SQLite may have rolled back already (a full disk does)
            db.execute("ROLLBACK")
        raise


class SQLiteJobStore:
    """A :class:`~kling_async.engine.store.JobStore` in one SQLite file (see the module
    docstring for why it is built this way).

    Open it with ``async with SQLiteJobStore(path) as store`` (or ``await store.open()`` and
    ``await store.aclose()``); its owner opens and closes it, and it may serve many clients
    one after another. ``path`` is created if missing, its directory is not.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "open" if self._db is not None else "closed"
        return f"SQLiteJobStore({str(self.path)!r}, {state})"

    # --- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file (creating its tables if needed); refused if it is already open, or
        if the file was written by a newer layout (:class:`JobStoreError`)."""
        if self._db is not None:
            raise UsageError(f"{self!r} is already open")
        self._db = await anyio.to_thread.run_sync(self._connect)

    async def aclose(self) -> None:
        """Close the file; safe to call more than once. Every ``save`` that returned is on disk."""
        db, self._db = self._db, None
        if db is not None:
            await anyio.to_thread.run_sync(self._close, db)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- the JobStore protocol --------------------------------------------------------------

    async def save(self, records: Iterable[JobRecord]) -> None:
        """Insert or replace ``records`` by id in one transaction; durable when it returns."""
        rows = [_encode(record) for record in records]
        if rows:
            await self._call(lambda db: _write(db, rows))

    async def load(self) -> list[JobRecord]:
        """Every record held, ended ones included, in the order they were first saved."""
        rows = await self._call(lambda db: db.execute(_SELECT).fetchall())
        return [_decode(self.path, row) for row in rows]

    # --- learned durations (a DurationStore too) -------------------------------------------

    async def load_durations(self) -> dict[ClassKey, DurationSummary]:
        """The summaries saved last, by class. A row that does not read as one (the file is
        outside input) is skipped with a warning: statistics only make polls cheaper."""
        rows = await self._call(
            lambda db: db.execute(
                "SELECT model, mode, duration, summary FROM kling_durations"
            ).fetchall()
        )
        loaded: dict[ClassKey, DurationSummary] = {}
        for model, mode, duration, summary in rows:
            try:
                key = (str(model), str(mode), str(duration))
                loaded[key] = DurationSummary.from_dict(json.loads(summary))
            except (ValueError, TypeError) as exc:
                log.warning(
                    "%s: the learned durations of %r are ignored (%s)",
                    self.path,
                    (model, mode, duration),
                    exc,
                )
        return loaded

    async def save_durations(self, summaries: Mapping[ClassKey, DurationSummary]) -> None:
        """Insert or replace the classes given, in one transaction (others are kept)."""
        rows = [(*key, _dumps(summary.to_dict())) for key, summary in summaries.items()]
        if rows:
            await self._call(lambda db: _write(db, rows, _SAVE_DURATION))

    async def forget_durations(self) -> None:
        """Delete every learned duration: the next client starts from its poll policy."""
        await self._call(lambda db: db.execute("DELETE FROM kling_durations"))

    # --- in the worker thread -----------------------------------------------------------------

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        if db is None:
            raise UsageError(
                f"{self!r} is not open: use `async with SQLiteJobStore(path) as store`, or "
                "pass the path to KlingClient(store=...) and let the client open it"
            )

        def run() -> T:
            with self._lock:
                return work(db)

        # A cancellation while the thread runs waits for it: a write is never left half-known.
        return await anyio.to_thread.run_sync(run, abandon_on_cancel=False)

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise JobStoreError(f"cannot open the job store {self.path}: {exc}") from None
        try:
            db.execute("PRAGMA busy_timeout=10000")
            self._use_wal(db)
            db.execute("PRAGMA synchronous=FULL")
            self._check_schema(db)
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                db.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise JobStoreError(f"{self.path} is not a usable job store: {exc}") from None
            raise
        return db

    def _use_wal(self, db: sqlite3.Connection) -> None:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise JobStoreError(f"{self.path}: SQLite refused WAL mode (got {mode})")

    def _check_schema(self, db: sqlite3.Connection) -> None:
        """Create the tables if missing; refuse a layout newer than this version's."""
        if self._version(db) is None:
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in [*_TABLES.split(";"), _DURATIONS]:
                    if statement.strip():
                        db.execute(statement)
                db.execute(
                    "INSERT OR IGNORE INTO kling_jobs_meta (key, value) VALUES ('schema', ?)",
                    (str(SCHEMA_VERSION),),
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        found = self._version(db)  # another process may have made them first
        if found != str(SCHEMA_VERSION):
            raise JobStoreError(
                f"{self.path} holds jobs in layout {found!r}, written by another version of "
                f"kling-async (this one reads layout {SCHEMA_VERSION}); use that version, or "
                "another file"
            )
        db.execute(_DURATIONS)  # a file of an earlier release gains the table

    @staticmethod
    def _version(db: sqlite3.Connection) -> str | None:
        """The layout version the file's tables say, or None if they are not all there."""
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        if not {"kling_jobs", "kling_jobs_meta"} <= tables:
            return None
        found = db.execute("SELECT value FROM kling_jobs_meta WHERE key = 'schema'").fetchone()
        return None if found is None else str(found[0])

    @staticmethod
    def _close(db: sqlite3.Connection) -> None:
        with contextlib.suppress(sqlite3.Error):  # a full disk may refuse the last checkpoint
            db.close()
