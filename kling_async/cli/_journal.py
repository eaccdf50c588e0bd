"""The batch journal: one SQLite file that makes a batch safe to kill and rerun.

The protocol, and why each step is there:

1. Every row of the file is written (row key, request hash, ``external_task_id``, status
   ``pending``) in **one transaction, synced to disk, before the first POST**. The
   ``external_task_id`` is the journal's random batch id and a number from the journal's own
   counter (never reused, so a new row can never take the id of an earlier one), so a rerun
   knows the id an earlier run may have used: a row that was POSTed but never heard back is
   looked up by that id instead of being created twice.
2. As soon as a job reports its ``task_id`` it is recorded; a rerun then simply follows the
   task. The record is a shortcut, not a safety net (step 1 is), so these updates are grouped
   into small transactions off the event loop.
3. Terminal states, result URLs, file names and SHA-256s are recorded as they happen: a rerun
   skips rows whose file is present with the recorded hash.

A row is keyed by what it asks for, not where it is (see :class:`~._prompts.PromptRow`), so
lines inserted or removed above it never make it another row; its number and line follow the
file. Schema 3 keys rows that way, with the request hash taken of the request's public
``to_dict()``. Older journals are migrated in place when a batch opens them, in one
transaction, keeping every row's ``external_task_id`` and ``task_id`` (so a rerun resubmits
nothing): schema 2 (the same keys, hashed from the request's wire body) has each stored
request re-read and re-hashed, its key keeping its occurrence number; schema 1 (keyed by
position) has each key recomputed from the stored request, in row order. Read-only opens
(``status``, ``--dry-run``) make the same conversion in memory and write nothing.

A batch shared by several machines (``--redis``) keeps a journal on each: the batch id is
then not random but the same on every machine (a hash of the file's rows, given to
:meth:`Journal.prepare`), so row N gets the same ``external_task_id`` everywhere; the journal
says it is shared (and names its machine), is refused to a run without ``--redis``, and marks
the rows another machine holds ``elsewhere``.

WAL mode with ``synchronous=FULL`` makes every commit durable when it returns while letting
``kling-async status`` read the journal of a running batch. A lock file next to the journal
keeps two batches from driving the same journal at once (the operating system drops the lock
when a process dies, even by ``kill -9``). Neither the journal, its ``-wal`` and ``-shm`` files
nor the lock file is ever opened through a symbolic link.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

import kling_async as ka

from . import _files
from ._naming import clip_name, unique_name
from ._prompts import PromptRow, canonical_json, request_from_body, request_hash, row_key

__all__ = [
    "JOURNAL_NAME",
    "STATUSES",
    "Journal",
    "JournalError",
    "JournalRow",
    "Preparation",
    "row_status",
    "stored_request",
]

JOURNAL_NAME: Final = "kling-journal.sqlite3"
SCHEMA_VERSION: Final = "4"
#: Schema 1 keyed rows by position ("#3"); schema 2 hashed the wire body of a request, not
#: its ``to_dict()``. Both are migrated to schema 3 when the journal opens (see the module
#: docstring); schema 3 kept each job's state in ``rows``, and is migrated to 4 (the job
#: store's tables) by :class:`~._jobs.BatchJobs`, which writes the job records first.
_MIGRATED: Final = ("1", "2")
_LEGACY: Final = ("1", "2", "3")

#: A row's status, as the journal reads it from the row's outcome and its job's record:
#: pending: journaled, maybe POSTed (a rerun looks it up by external id before creating);
#: submitted / processing: the task exists (task_id known); succeeded: the task made its video,
#: not downloaded yet; done: the file is in place with its sha256; failed: the task failed;
#: rejected: the request was refused (policy, invalid) and will not be sent again;
#: elsewhere: another machine of a batch shared through Redis holds the row (its clip is there).
STATUSES: Final = (
    "pending",
    "submitted",
    "processing",
    "succeeded",
    "done",
    "failed",
    "rejected",
    "elsewhere",
)
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
    outcome TEXT,
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
#: ``rows`` holds what is the batch's own: the row's identity and place, its request, its job
#: id (``external_task_id``, the id of its record in the job store's ``kling_jobs``), its clip
#: file and download, the batch's words for how it ended (``error``) and its times.
#: ``outcome`` is the batch's verdict when it has one: ``done`` (the clip is in place with its
#: sha256) or ``rejected`` (refused by the server, not sent again); otherwise the row stands
#: where its job does (task id, status, possible duplicate: the job store's record).

#: Columns a run may update after the rows are written.
UPDATABLE: Final = frozenset(
    {
        "outcome",
        "video_id",
        "video_url",
        "sha256",
        "size",
        "error",
        "submitted_at",
        "finished_at",
    }
)
#: The batch's verdicts a row's ``outcome`` may hold (``elsewhere``: another machine of a
#: shared batch holds it; not final, the next run asks Redis again).
OUTCOMES: Final = frozenset({"done", "rejected", "elsewhere"})


class JournalError(Exception):
    """The journal cannot be used for this run (busy, foreign, newer schema, unreadable, a
    link at its name, a full disk)."""


def _write_error(path: Path, exc: BaseException) -> JournalError:
    if _files.is_disk_full(exc):
        return JournalError(f"{_files.disk_full_message(path.parent)}: cannot write {path}")
    return JournalError(f"cannot write the journal {path}: {exc}")


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
    #: The backend may hold two tasks for this row (see ``Job.possible_duplicate``).
    possible_duplicate: bool = False

    @property
    def seconds(self) -> float | None:
        if self.submitted_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.submitted_at)


_COLUMNS: Final = (
    "row_key, number, line, request_hash, request_json, external_task_id, attempt, task_id, "
    "status, video_id, video_url, file, sha256, size, error, submitted_at, finished_at, "
    "possible_duplicate"
)
#: The same, for a journal written before ``possible_duplicate`` was a column.
_OLD_COLUMNS: Final = _COLUMNS.replace("possible_duplicate", "0")

#: A row of schema 4 with its job's record beside it (the status is worked out in Python).
_JOINED: Final = (
    "SELECT r.row_key, r.number, r.line, r.request_hash, r.request_json, r.external_task_id, "
    "r.attempt, {job}task_id, r.outcome, {job}status, {job}task, r.video_id, r.video_url, "
    "r.file, r.sha256, r.size, r.error, r.submitted_at, r.finished_at, "
    "{job}possible_duplicate FROM rows r {join} ORDER BY r.number, r.rowid"
)
_WITH_JOBS: Final = _JOINED.format(
    job="j.", join="LEFT JOIN kling_jobs j ON j.id = r.external_task_id"
)
#: Before the job store's tables exist (a journal just made): no row has a job yet.
_WITHOUT_JOBS: Final = _JOINED.format(job="NULL AS ", join="")

_STATUS_OF_JOB: Final = {
    "queued": "pending",
    "submitting": "pending",
    "submitted": "submitted",
    "unknown": "submitted",
    "processing": "processing",
    "succeed": "succeeded",
    "failed": "failed",
}


def row_status(outcome: str | None, job: str | None, task_id: str | None, task: str | None) -> str:
    """Where a row stands: the batch's verdict if it has one, else where its job does. A job
    that ended in an error stands where it got to: ``pending`` without a task (a rerun looks
    it up), else as its task was last seen (a rerun follows it)."""
    if outcome in OUTCOMES:
        return str(outcome)
    if job is None:
        return "pending"
    if job in _STATUS_OF_JOB:
        return _STATUS_OF_JOB[job]
    if task_id is None:
        return "pending"
    seen = None
    if task is not None:
        with contextlib.suppress(ValueError, AttributeError):
            seen = json.loads(task).get("status")
    return "processing" if seen == "processing" else "submitted"


def _joined_row(record: Sequence[Any]) -> JournalRow:
    (
        key,
        number,
        line,
        request_hash_,
        request_json,
        external_task_id,
        attempt,
        task_id,
        outcome,
        job,
        task,
        video_id,
        video_url,
        file,
        sha256,
        size,
        error,
        submitted_at,
        finished_at,
        possible_duplicate,
    ) = record
    return JournalRow(
        key=key,
        number=number,
        line=line,
        request_hash=request_hash_,
        request_json=request_json,
        external_task_id=external_task_id,
        attempt=attempt,
        task_id=task_id,
        status=row_status(outcome, job, task_id, task),
        video_id=video_id,
        video_url=video_url,
        file=file,
        sha256=sha256,
        size=size,
        error=error,
        submitted_at=submitted_at,
        finished_at=finished_at,
        possible_duplicate=bool(possible_duplicate),
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
        possible_duplicate,
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
        possible_duplicate=bool(possible_duplicate),
    )


def _has_column(db: sqlite3.Connection, column: str, table: str = "rows") -> bool:
    return any(info[1] == column for info in db.execute(f"PRAGMA table_info({table})"))


def _has_table(db: sqlite3.Connection, table: str) -> bool:
    found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,))
    return found.fetchone() is not None


def stored_request(record: JournalRow) -> ka.Text2VideoRequest:
    """The request a row's job sends: the stored request (schema 3 and later keep its
    ``to_dict()``) under the row's ``external_task_id``."""
    request = ka.Text2VideoRequest.from_dict(json.loads(record.request_json))
    return attrs.evolve(request, external_task_id=record.external_task_id)


#: How a schema-3 row's state becomes its job's record (pending rows may have been POSTed).
_JOB_OF_STATUS: Final = {
    "pending": ka.JobStatus.QUEUED,
    "submitted": ka.JobStatus.SUBMITTED,
    "processing": ka.JobStatus.PROCESSING,
    "succeeded": ka.JobStatus.SUCCEEDED,
    "done": ka.JobStatus.SUCCEEDED,
    "failed": ka.JobStatus.FAILED,
    "rejected": ka.JobStatus.ERROR,
}


def legacy_record(record: JournalRow, now: float) -> ka.JobRecord:
    """The job store's record of a schema-3 row: its task id, state and flag kept, ``sent``
    True (the row was journaled before its POST, so it may have gone out)."""
    status = _JOB_OF_STATUS.get(record.status, ka.JobStatus.QUEUED)
    ended = status.is_terminal
    return ka.JobRecord(
        id=record.external_task_id,
        request=stored_request(record),
        task_id=record.task_id,
        status=status,
        sent=True,
        possible_duplicate=record.possible_duplicate,
        error=record.error if ended and status is not ka.JobStatus.SUCCEEDED else None,
        error_type="TaskFailedError" if status is ka.JobStatus.FAILED else None,
        created_at=record.submitted_at or now,
        updated_at=record.finished_at or record.submitted_at or now,
    )


@attrs.frozen
class Preparation:
    """What :meth:`Journal.prepare` found and did.

    ``rows``: the journal's view of every row of the file that can run (changed rows excluded);
    ``fresh``: keys written by this preparation and so certainly never POSTed;
    ``changed``: (file row, journal row) pairs of rows with their own ``external_task_id``
    whose request differs from the one journaled under that id;
    ``orphans``: journal rows the file no longer has (removed, or edited into another row).
    """

    rows: dict[str, JournalRow]
    fresh: frozenset[str]
    changed: tuple[tuple[PromptRow, JournalRow], ...]
    orphans: tuple[JournalRow, ...]


def migrated_keys(records: Iterable[JournalRow]) -> list[str]:
    """Keys for schema-1 rows given in row order: a row's own id stays its key; any other
    row's is the hash of its stored request and its occurrence among identical ones."""
    occurrences: dict[str, int] = {}
    keys = []
    for record in records:
        if record.key.startswith("id:"):
            keys.append(record.key)
            continue
        digest = request_hash(record.request_json)
        occurrences[digest] = occurrences.get(digest, 0) + 1
        keys.append(row_key(None, digest, occurrences[digest]))
    return keys


def rehashed(record: JournalRow) -> JournalRow:
    """A row of a schema-1 or -2 journal with its request as schema 3 stores it: the JSON
    and hash of the request's ``to_dict()`` instead of its wire body. The key is left alone
    (the caller re-keys); the job's ids and state are kept."""
    request = request_from_body(json.loads(record.request_json))
    encoded = canonical_json(request)
    return attrs.evolve(record, request_json=encoded, request_hash=request_hash(encoded))


def upgraded(records: Sequence[JournalRow], version: str) -> list[JournalRow]:
    """Rows of a schema-``version`` journal (in row order) as schema 3 has them.

    Schema 2 keys are ``<hash>#<n>``: equal requests had equal wire bodies and have equal
    ``to_dict()`` forms, so ``n`` (the occurrence among them) carries over to the new hash.
    Schema 1 keys are positions: they are recomputed in row order.
    """
    converted = [rehashed(record) for record in records]
    if version == "1":
        keys = migrated_keys(converted)
    else:
        keys = [
            record.key
            if record.key.startswith("id:")
            else row_key(None, record.request_hash, int(record.key.rpartition("#")[2]))
            for record in converted
        ]
    return [attrs.evolve(record, key=key) for record, key in zip(converted, keys, strict=True)]


def _companions(path: Path) -> tuple[Path, ...]:
    """The journal and the files SQLite keeps beside it."""
    return (path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal")))


def _create(path: Path) -> bool:
    """Make sure ``path`` is a regular file, never through a link; True if made here."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except FileExistsError:
        _files.check_not_link(path)
        if not stat.S_ISREG(path.lstat().st_mode):
            raise _files.FileError(
                f"{path} is not a regular file; it cannot be a journal"
            ) from None
        return False
    os.close(fd)
    return True


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA busy_timeout=10000")
    mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        connection.close()
        raise JournalError(f"{path}: SQLite refused WAL mode (got {mode})")
    connection.execute("PRAGMA synchronous=FULL")
    # Two connections write this file (the rows here, the job records in the job store's):
    # checkpoint the WAL early so it stays small (SQLite's default lets it grow to 4 MB),
    # which matters most on a nearly full disk.
    connection.execute("PRAGMA wal_autocheckpoint=64")
    connection.executescript(_SCHEMA)
    return connection


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot change the file (``status``, ``--dry-run``): no WAL switch,
    no schema; a file without the journal's tables is refused, not made into one."""
    uri = f"file:{urllib.parse.quote(str(path.absolute()))}?mode=ro"
    connection = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    try:
        connection.execute("PRAGMA busy_timeout=10000")
        usable = _has_table(connection, "meta") and _has_table(connection, "rows")
    except BaseException:
        connection.close()
        raise
    if not usable:
        connection.close()
        raise JournalError(f"{path} is not a kling-async journal (it has no batch rows)")
    return connection


class Journal:
    """One batch's journal. Methods are synchronous and short; callers on an event loop run
    :meth:`apply` in a worker thread (the connection allows that, and only one call runs at a
    time)."""

    def __init__(
        self,
        path: Path,
        connection: sqlite3.Connection,
        lock_fd: int | None,
        *,
        writable: bool = True,
    ) -> None:
        self.path = path
        self._db = connection
        self._lock_fd = lock_fd
        self.meta: dict[str, str] = dict(self._db.execute("SELECT key, value FROM meta"))
        #: An older journal opened read-only: its rows are converted on every read instead.
        self._legacy: str | None = None
        self._has_duplicate_column = _has_column(connection, "possible_duplicate")
        #: Rows keep their job's state in their own columns (schema 3 and older) until
        #: :meth:`finish_migration` moves it to the job store's records.
        self.legacy_layout = _has_column(connection, "status")
        version = self.meta.get("schema", SCHEMA_VERSION)
        if version == SCHEMA_VERSION and self.legacy_layout:
            version = "3"  # a file of schema 3 that never said so (it always did)
        if version in _MIGRATED:
            if writable:
                self._migrate(version)
            else:
                self._legacy = version
        elif version not in _LEGACY and version != SCHEMA_VERSION:
            self.close()
            raise JournalError(
                f"{path} was written by another version of kling-async (schema {version}); "
                "use that version, or another --out directory"
            )
        elif writable and self.legacy_layout and not self._has_duplicate_column:
            connection.execute(
                "ALTER TABLE rows ADD COLUMN possible_duplicate INTEGER NOT NULL DEFAULT 0"
            )
            self._has_duplicate_column = True

    @classmethod
    def open(cls, path: Path, *, lock: bool = True) -> Journal:
        """Open (creating if needed) with WAL and full sync; ``lock`` for a run that writes.
        Without ``lock`` the file is only read, never created or changed.

        Refused: a journal, ``-wal`` or ``-shm`` path that is a symbolic link, a lock file
        that is one, a journal in use by another batch. Nothing is left behind by a journal
        that could not be created (a full disk, say)."""
        lock_fd: int | None = None
        made: list[Path] = []
        try:
            for companion in _companions(path):
                _files.check_not_link(companion)
            if lock:
                path.parent.mkdir(parents=True, exist_ok=True)
                lock_fd = _files.lock(
                    path.with_name(path.name + ".lock"),
                    busy=f"another kling-async batch is using the journal {path} right now; "
                    "wait for it to finish or stop it first",
                )
                if _create(path):
                    made = [p for p in _companions(path) if not p.exists()] + [path]
            connection = _connect(path) if lock else _connect_read_only(path)
            return cls(path, connection, lock_fd, writable=lock)
        except BaseException as exc:
            _files.unlock(lock_fd)
            for leftover in made:
                with contextlib.suppress(OSError):
                    leftover.unlink()
            if isinstance(exc, JournalError):
                raise
            if isinstance(exc, _files.FileError):
                raise JournalError(str(exc)) from None
            if _files.is_disk_full(exc):
                raise JournalError(
                    f"{_files.disk_full_message(path.parent)}: cannot create or open {path}"
                ) from None
            if isinstance(exc, sqlite3.DatabaseError):
                raise JournalError(f"{path} is not a usable journal: {exc}") from None
            if isinstance(exc, OSError):
                if exc.errno == errno.ELOOP:
                    raise JournalError(f"{path}: a symbolic link is in the way") from None
                raise JournalError(f"cannot open the journal {path}: {exc}") from None
            raise

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):  # a full disk may refuse the last checkpoint
            self._db.close()
        _files.unlock(self._lock_fd)
        self._lock_fd = None

    @property
    def batch_id(self) -> str | None:
        return self.meta.get("batch_id")

    @property
    def shared(self) -> bool:
        """The batch is shared by several machines through Redis (``--redis``)."""
        return self.meta.get("shared") == "redis"

    @property
    def machine(self) -> str | None:
        """This journal's machine in a shared batch (the name it goes by in Redis)."""
        return self.meta.get("machine")

    def rows(self) -> dict[str, JournalRow]:
        """Every row, in file order (rows no longer in the file where they last were), each
        with its job's state from the job store's record (or, in a journal of schema 3 or
        older, from its own columns)."""
        if not self.legacy_layout:
            query = _WITH_JOBS if _has_table(self._db, "kling_jobs") else _WITHOUT_JOBS
            return {row.key: row for row in map(_joined_row, self._db.execute(query))}
        columns = _COLUMNS if self._has_duplicate_column else _OLD_COLUMNS
        cursor = self._db.execute(
            f"SELECT {columns} FROM rows ORDER BY number, rowid"  # noqa: S608
        )
        records = [_row(record) for record in cursor]
        if self._legacy is not None:
            records = upgraded(records, self._legacy)
        return {record.key: record for record in records}

    def _migrate(self, version: str) -> None:
        """Schema 1 or 2 to 3, in one transaction: keys by content, request hashes of
        ``to_dict()``, and (from schema 1) the id counter."""
        self._legacy = version
        try:
            old = list(self.rows().values())  # in row order, converted
        finally:
            self._legacy = None
        columns = _COLUMNS if self._has_duplicate_column else _OLD_COLUMNS
        keys = [
            row[0]
            for row in self._db.execute(
                f"SELECT {columns} FROM rows ORDER BY number, rowid"  # noqa: S608
            )
        ]
        meta = [("schema", SCHEMA_VERSION)]
        if "next_id" not in self.meta:
            meta.append(("next_id", str(max([r.number for r in old], default=0) + 1)))
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            # Keys move in two steps, so a new key never collides with an old one not yet moved.
            db.executemany(
                "UPDATE rows SET row_key = ? WHERE row_key = ?",
                [(f"migrating:{index}", key) for index, key in enumerate(keys)],
            )
            db.executemany(
                "UPDATE rows SET row_key = ?, request_hash = ?, request_json = ? WHERE row_key = ?",
                [
                    (r.key, r.request_hash, r.request_json, f"migrating:{index}")
                    for index, r in enumerate(old)
                ],
            )
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta)
            if not self._has_duplicate_column:
                db.execute(
                    "ALTER TABLE rows ADD COLUMN possible_duplicate INTEGER NOT NULL DEFAULT 0"
                )
            db.execute("COMMIT")
            self._has_duplicate_column = True
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self.close()
            raise _write_error(self.path, exc) from None
        self.meta = dict(db.execute("SELECT key, value FROM meta"))

    def legacy_records(self) -> list[ka.JobRecord] | None:
        """The job store's records of a schema-3 journal's rows (every task id kept), or None
        if the journal keeps job state in the job store already."""
        if not self.legacy_layout:
            return None
        now = time.time()
        return [legacy_record(record, now) for record in self.rows().values()]

    def finish_migration(self) -> None:
        """Schema 3 to 4, in one transaction, once the rows' job records are in the job store
        (:meth:`legacy_records`): each row keeps its batch columns and its verdict
        (``outcome``), and its job's columns go. A crash before this leaves schema 3 with the
        records written, and the next open writes the same records again."""
        if not self.legacy_layout:
            return
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ALTER TABLE rows ADD COLUMN outcome TEXT")
            db.execute("UPDATE rows SET outcome = status WHERE status IN ('done', 'rejected')")
            for column in ("task_id", "status", "possible_duplicate"):
                if _has_column(db, column):
                    db.execute(f"ALTER TABLE rows DROP COLUMN {column}")
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,)
            )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise _write_error(self.path, exc) from None
        self.legacy_layout = False
        self.meta = dict(db.execute("SELECT key, value FROM meta"))

    # --- before any POST ----------------------------------------------------------------------

    def prepare(
        self,
        rows: Sequence[PromptRow],
        *,
        backend: str,
        prompts: str,
        restart: Callable[[JournalRow], bool] | None = None,
        batch_id: str | None = None,
        machine: Callable[[str], str] | None = None,
    ) -> Preparation:
        """Reconcile the file with the journal in one durable transaction, before any POST.

        New rows are written ``pending`` with their ``external_task_id`` (their own, or the
        next of the journal's counter) and a file name no other row has. Known rows take the
        number and line they have in the file now. Rows for which
        ``restart`` says so start over as a new attempt, with a new external id so that the
        old task can never be adopted by mistake: failed rows with ``--retry-failed``, and the
        unfinished rows of an in-process emulator that is gone with its tasks. Raises
        :class:`JournalError` if the journal belongs to another backend.

        ``batch_id`` (a batch shared through Redis): the batch id every machine computes from
        the file, used for a new journal, and required of an existing one; ``machine`` names
        this journal's machine from a random token, once. A shared journal is refused to a
        run that is not shared, and the other way round.
        """
        if self.legacy_layout:
            raise JournalError(
                f"{self.path} keeps its jobs the old way (schema 3): open its job store "
                "(BatchJobs) first, which migrates it"
            )
        known_backend = self.meta.get("backend")
        if known_backend is not None and known_backend != backend:
            raise JournalError(
                f"{self.path} belongs to a batch run against {known_backend}, not {backend}: "
                "its tasks cannot be followed from here; use another --out directory"
            )
        if self.batch_id is not None and self.shared and batch_id is None:
            raise JournalError(
                f"{self.path} holds batch {self.batch_id}, which several machines share "
                "through Redis: run it with --redis URL (or KLING_REDIS_URL), or its rows "
                "would be sent without the other machines knowing"
            )
        if self.batch_id is not None and batch_id is not None and self.batch_id != batch_id:
            what = (
                f"shared batch {self.batch_id}, not this file's ({batch_id}): with --redis a "
                "batch is exactly the file's rows (and request defaults), so an edited file "
                "is another batch"
                if self.shared
                else f"batch {self.batch_id}, run without --redis"
            )
            raise JournalError(f"{self.path} holds {what}; use another --out directory")
        existing = self.rows()
        now = time.time()
        new_batch = self.batch_id is None
        batch_id = self.batch_id or batch_id or secrets.token_hex(6)
        total = max([row.number for row in rows] + [row.number for row in existing.values()])
        used_ids = {record.external_task_id for record in existing.values()}
        used_files = {record.file for record in existing.values()}
        # One number per new row, never reused: on a first run row N gets kb-<batch>-N.
        counter = int(self.meta.get("next_id", "1"))
        fresh: set[str] = set()
        changed: list[tuple[PromptRow, JournalRow]] = []
        inserts: list[tuple[Any, ...]] = []
        moves: list[tuple[int, int, str]] = []
        restarts: list[tuple[str, int, str]] = []
        for row in rows:
            known = existing.get(row.key)
            if known is None:
                own = row.request.external_task_id
                if own is not None and own in used_ids:
                    raise JournalError(
                        f"row {row.number} (line {row.line}): external_task_id={own!r} is "
                        f"already the id of another row of {self.path}; give the row another"
                    )
                external = own
                while external is None or external in used_ids:
                    external = f"kb-{batch_id}-{counter}"
                    counter += 1
                if own is not None:
                    counter += 1
                used_ids.add(external)
                name = unique_name(clip_name(row.number, row.request.prompt, total), used_files)
                used_files.add(name)
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
                continue
            if (known.number, known.line) != (row.number, row.line):
                moves.append((row.number, row.line, row.key))
            if known.request_hash != row.request_hash:  # only a row keyed by its own id
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
        try:
            db.execute("BEGIN IMMEDIATE")
            if new_batch:
                first = [
                    ("schema", SCHEMA_VERSION),
                    ("batch_id", batch_id),
                    ("backend", backend),
                    ("created_at", str(now)),
                ]
                if machine is not None:
                    first += [("shared", "redis"), ("machine", machine(secrets.token_hex(3)))]
                db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", first)
            db.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [("prompts", prompts), ("next_id", str(counter))],
            )
            db.executemany(
                "INSERT INTO rows (row_key, number, line, request_hash, request_json, "
                "external_task_id, file, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                inserts,
            )
            # A new attempt is a new job (a new id, no record yet); the old attempt's record
            # stays in the job store, where no row points at it any more.
            db.executemany(
                "UPDATE rows SET attempt = ?, external_task_id = ?, outcome = NULL, "
                "video_id = NULL, video_url = NULL, sha256 = NULL, "
                "size = NULL, error = NULL, submitted_at = NULL, finished_at = NULL, "
                "updated_at = ? WHERE row_key = ?",
                [(attempt, external, now, key) for key, attempt, external in restarts],
            )
            db.executemany("UPDATE rows SET number = ?, line = ? WHERE row_key = ?", moves)
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _write_error(self.path, exc) from None
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
            if db.in_transaction:  # SQLite may have rolled back already (a full disk does)
                db.execute("ROLLBACK")
            raise


def existing_rows(path: Path) -> tuple[dict[str, str], dict[str, JournalRow]] | None:
    """The meta and rows of a journal, for reading only (``status``, ``--dry-run``), or None
    if there is no journal at ``path``. Never creates one."""
    if not path.is_file() and not path.is_symlink():
        return None
    journal = Journal.open(path, lock=False)
    try:
        return dict(journal.meta), journal.rows()
    finally:
        journal.close()


def journal_path(out: Path, journal: Path | None) -> Path:
    return journal if journal is not None else out / JOURNAL_NAME
