"""The state file: the emulator's tasks in SQLite, so a restarted emulator is the same account.

A test that kills the emulator (``kill -9``) and starts another must find every task a client
was told about, with the same ids, external ids, video ids and bytes, and statuses that went on
by the wall clock meanwhile. So:

* every create is written and synced (WAL, ``synchronous=FULL``) before it is answered. Creates
  that arrive while a write is in flight share the next transaction (group commit), so the sync
  cost is paid once per batch, not once per task; a create costs about one fsync;
* a task is hidden from every lookup until its row is synced (the store's ``unsaved`` set), so
  nothing a client can see is lost either;
* instants are stored as wall-clock Unix times (:meth:`EmulatedClock.wall_time`), so a restart
  with another ``time_scale`` sees each task change status at the same real moments;
* the seed and the URL-signing key are stored, so video bytes and signed URLs stay valid, and a
  session counter gives each restart its own random stream (new ids never collide with old ones);
* the file is locked (``locking_mode=EXCLUSIVE``) while an emulator uses it: a second one gets a
  clear error instead of a split brain. The operating system drops the lock when a process dies.

A file that is a symbolic link, or that exists and is not an emulator state file (another SQLite
database, any other file), is refused with :class:`StateFileError`: a test tool must not be
pointed at something it could clobber.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sqlite3
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
import attrs

from ._clock import EmulatedClock
from ._state import EmulatedTask, EmulatedVideo

FORMAT: Final = "kling-async-emulator-state"
VERSION: Final = "1"
_SQLITE_MAGIC: Final = b"SQLite format 3\x00"

_SCHEMA: Final = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL UNIQUE,
    external_task_id TEXT,
    model_name TEXT NOT NULL,
    mode TEXT NOT NULL,
    duration TEXT NOT NULL,
    aspect_ratio TEXT NOT NULL,
    callback_url TEXT,
    created_wall REAL NOT NULL,
    started_wall REAL NOT NULL,
    completes_wall REAL NOT NULL,
    visible_wall REAL NOT NULL,
    outcome TEXT NOT NULL,
    failure_message TEXT NOT NULL,
    videos TEXT NOT NULL,
    final_unit_deduction TEXT NOT NULL,
    request TEXT NOT NULL
)""",
)
_COLUMNS: Final = (
    "task_id, external_task_id, model_name, mode, duration, aspect_ratio, callback_url, "
    "created_wall, started_wall, completes_wall, visible_wall, outcome, failure_message, "
    "videos, final_unit_deduction, request"
)
_INSERT: Final = f"INSERT INTO tasks ({_COLUMNS}) VALUES ({', '.join('?' * 16)})"  # noqa: S608

Row = tuple[Any, ...]


class StateFileError(ValueError):
    """The state file cannot be used: a symlink, not a state file, in use, or unreadable."""


@attrs.frozen
class StateHeader:
    """What a state file says about itself: its seed, URL key and how many sessions it had."""

    seed: int
    key: bytes = attrs.field(repr=False)
    sessions: int


def _refuse_symlink(path: Path) -> None:
    if path.is_symlink():
        raise StateFileError(f"state file {str(path)!r} is a symbolic link; refusing to follow it")


def _connect(path: Path) -> sqlite3.Connection:
    try:
        # isolation_level=None: transactions are explicit (BEGIN ... COMMIT) below. A short
        # timeout: the only contender is another emulator holding the file, which never lets go.
        return sqlite3.connect(path, timeout=0.1, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StateFileError(f"cannot open state file {str(path)!r}: {exc}") from None


def _read_header(connection: sqlite3.Connection, path: Path) -> StateHeader | None:
    """The header of an existing state file, None for an empty database; refuses the rest."""
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        if not tables:
            return None
        meta = dict(connection.execute("SELECT key, value FROM meta")) if "meta" in tables else {}
        if meta.get("format") != FORMAT or "tasks" not in tables:
            raise StateFileError(
                f"{str(path)!r} is an SQLite database but not an emulator state file; "
                "refusing to touch it"
            )
        if meta.get("version") != VERSION:
            raise StateFileError(
                f"state file {str(path)!r} has format version {meta.get('version')!r}; "
                f"this emulator reads version {VERSION}"
            )
        return StateHeader(
            seed=int(meta["seed"]), key=bytes.fromhex(meta["key"]), sessions=int(meta["sessions"])
        )
    except sqlite3.Error as exc:
        if "locked" in str(exc):
            raise StateFileError(
                f"state file {str(path)!r} is in use by another emulator"
            ) from None
        raise StateFileError(f"{str(path)!r} is not an emulator state file ({exc})") from None
    except (KeyError, ValueError) as exc:
        if isinstance(exc, StateFileError):
            raise
        raise StateFileError(f"state file {str(path)!r} has a damaged header ({exc})") from None


def inspect_state_file(path: str | os.PathLike[str]) -> StateHeader | None:
    """Check a state file before use: its header, None if it does not exist yet (or is empty).

    Read-only and quick, so the emulator's constructor can refuse a bad path at once (the command
    line then exits 2 with the reason) instead of failing at start.
    """
    target = Path(path)
    _refuse_symlink(target)
    try:
        info = target.stat()
    except FileNotFoundError:
        if not target.parent.is_dir():
            raise StateFileError(
                f"cannot create state file {str(target)!r}: {str(target.parent)!r} is not a "
                "directory"
            ) from None
        return None
    if not stat.S_ISREG(info.st_mode):
        raise StateFileError(f"state file {str(target)!r} is not a regular file")
    if info.st_size == 0:
        return None
    with target.open("rb") as file:
        if file.read(len(_SQLITE_MAGIC)) != _SQLITE_MAGIC:
            raise StateFileError(f"{str(target)!r} is not an emulator state file")
    connection = _connect(target)
    try:
        return _read_header(connection, target)
    finally:
        connection.close()


def _videos_json(videos: Iterable[EmulatedVideo]) -> str:
    return json.dumps([[video.id, video.duration] for video in videos], separators=(",", ":"))


class StateFile:
    """One emulator's open state file: load at start, durable writes per create, close at end.

    All SQLite work runs in a worker thread, one operation at a time (an asyncio lock), so the
    event loop never waits on a sync while other requests are served.
    """

    def __init__(self, path: str | os.PathLike[str], *, clock: EmulatedClock) -> None:
        self._path = Path(path)
        self._clock = clock
        self._connection: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._pending: list[tuple[int, Row]] = []
        self._next_seq = 0
        self._durable_through = -1
        self._seq_of: dict[str, int] = {}
        self._on_saved: list[set[str]] = []

    @property
    def path(self) -> Path:
        return self._path

    def track(self, unsaved: set[str]) -> None:
        """Remove task ids from ``unsaved`` once their rows are synced."""
        self._on_saved.append(unsaved)

    # -- open and load ------------------------------------------------------------------------

    async def open(self, header: StateHeader) -> list[EmulatedTask]:
        """Open (creating it if new), lock it, record this session, and load every task."""
        return await anyio.to_thread.run_sync(self._open_sync, header)

    def _open_sync(self, header: StateHeader) -> list[EmulatedTask]:
        path = self._path
        _refuse_symlink(path)
        connection = _connect(path)
        try:
            return self._load(connection, header)
        except sqlite3.Error as exc:
            connection.close()
            if "locked" in str(exc):
                raise StateFileError(
                    f"state file {str(path)!r} is in use by another emulator"
                ) from None
            raise StateFileError(f"cannot use state file {str(path)!r}: {exc}") from None
        except BaseException:
            connection.close()
            raise

    def _load(self, connection: sqlite3.Connection, header: StateHeader) -> list[EmulatedTask]:
        path = self._path
        connection.execute("PRAGMA locking_mode = EXCLUSIVE")
        connection.execute("BEGIN IMMEDIATE")  # takes the lock (kept: exclusive mode)
        existing = _read_header(connection, path)
        connection.execute("COMMIT")
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise StateFileError(f"state file {str(path)!r}: cannot switch to WAL mode")
        connection.execute("PRAGMA synchronous = FULL")
        connection.execute("BEGIN IMMEDIATE")
        if existing is None:
            for statement in _SCHEMA:
                connection.execute(statement)
        elif existing != header:
            raise StateFileError(f"state file {str(path)!r} changed since it was checked")
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "seed": str(header.seed),
            "key": header.key.hex(),
            "sessions": str(header.sessions + 1),
        }
        connection.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta.items()
        )
        query = f"SELECT {_COLUMNS} FROM tasks ORDER BY seq"  # noqa: S608
        rows = connection.execute(query).fetchall()
        connection.execute("COMMIT")
        self._connection = connection
        return [self._task(row) for row in rows]

    def _task(self, row: Row) -> EmulatedTask:
        at = self._clock.at_wall
        (task_id, external, model, mode, duration, ratio, callback) = row[:7]
        created, started, completes, visible = row[7:11]
        outcome, failure, videos, units, request = row[11:]
        return EmulatedTask(
            task_id=task_id,
            external_task_id=external,
            model_name=model,
            mode=mode,
            duration=duration,
            aspect_ratio=ratio,
            callback_url=callback,
            created_at=at(created),
            started_at=at(started),
            completes_at=at(completes),
            outcome=outcome,
            failure_message=failure,
            videos=tuple(EmulatedVideo(id=vid, duration=dur) for vid, dur in json.loads(videos)),
            final_unit_deduction=units,
            request=json.loads(request),
            visible_at=at(visible),
        )

    # -- writes --------------------------------------------------------------------------------

    def _row(self, task: EmulatedTask) -> Row:
        wall = self._clock.wall_time
        return (
            task.task_id,
            task.external_task_id,
            task.model_name,
            task.mode,
            task.duration,
            task.aspect_ratio,
            task.callback_url,
            wall(task.created_at),
            wall(task.started_at),
            wall(task.completes_at),
            wall(task.visible_at),
            task.outcome,
            task.failure_message,
            _videos_json(task.videos),
            task.final_unit_deduction,
            json.dumps(dict(task.request), separators=(",", ":"), ensure_ascii=False),
        )

    def queue(self, task: EmulatedTask) -> None:
        """Queue a new task's row (synchronously, in creation order); :meth:`saved` syncs it."""
        seq = self._next_seq
        self._next_seq += 1
        self._seq_of[task.task_id] = seq
        self._pending.append((seq, self._row(task)))
        for unsaved in self._on_saved:
            unsaved.add(task.task_id)

    async def saved(self, task: EmulatedTask) -> None:
        """Return once ``task``'s row is synced; writes everything queued if no one else is."""
        seq = self._seq_of.get(task.task_id)
        if seq is None:
            return  # loaded from the file, or already synced
        while self._durable_through < seq:
            async with self._lock:
                if self._durable_through >= seq:
                    break
                batch, self._pending = self._pending, []
                if not batch:
                    raise StateFileError(f"task {task.task_id} was never queued")
                try:
                    # Shielded: a cancelled handler must not leave a written batch marked unwritten.
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(self._write_sync, [row for _, row in batch])
                except Exception:
                    self._pending[:0] = batch  # written by the next attempt, in order
                    raise
                self._durable_through = batch[-1][0]
                done = [row[0] for _, row in batch]
                for task_id in done:
                    del self._seq_of[task_id]
                for unsaved in self._on_saved:
                    unsaved.difference_update(done)

    def _write_sync(self, rows: Sequence[Row]) -> None:
        connection = self._connection
        if connection is None:
            raise StateFileError("the state file is closed")
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(_INSERT, rows)
            connection.execute("COMMIT")  # synchronous=FULL: the WAL is synced before this returns
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    async def aclose(self) -> None:
        """Close the file (after the last write); a second call does nothing."""
        async with self._lock:
            connection, self._connection = self._connection, None
            if connection is not None:
                await anyio.to_thread.run_sync(connection.close)


def new_header(seed: int) -> StateHeader:
    """The header a new state file starts with: the seed and a fresh URL-signing key."""
    return StateHeader(seed=seed, key=secrets.token_bytes(32), sessions=0)
