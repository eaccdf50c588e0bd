"""The job store seam: where a client keeps its jobs so that a restart loses none.

A client given ``store=`` writes each job's record there as the job moves (its request and id
when queued, a mark before its first create goes out, its task id once known, each state
change, its end) and, when it opens, loads the store's records: unfinished jobs are followed
again (a job with a task id by polling it, one without by looking it up by its id before any
create is re-sent), and ended ones answer :meth:`KlingClient.job` as before the restart.

:class:`MemoryJobStore` is the in-process default; ``SQLiteJobStore`` keeps the records in one
SQLite file (the batch tool's journal and the FastAPI integration use it); a Redis store
shares them between workers. Writes are coalesced per job and made in the client's task group,
so a slow store never stalls a poller; the mark before a create is the one write the engine
waits for, since a record of "about to send" is what makes a resumed create safe.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import attrs

from kling_async.engine.jobs import JobStatus
from kling_async.protocol.models import Task, Text2VideoRequest

__all__ = ["JobRecord", "JobStore", "MemoryJobStore"]


@attrs.frozen(kw_only=True)
class JobRecord:
    """What a job store keeps of one job: enough to resume it and to answer for it.

    ``id`` is the job's id (its ``external_task_id``). ``request`` is None for a job that
    follows a task created elsewhere (``track``). ``sent`` is True from the moment a create
    for it may have gone out: a resumed job with ``sent`` False is created without doubt, one
    with ``sent`` True is looked up first. ``error`` is the message of the error a job ended
    with (already free of secrets), ``error_type`` that error's class name. Times are Unix
    seconds.
    """

    id: str
    request: Text2VideoRequest | None = None
    task_id: str | None = None
    status: JobStatus = JobStatus.QUEUED
    task: Task | None = None
    sent: bool = False
    possible_duplicate: bool = False
    error: str | None = None
    error_type: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def finished(self) -> bool:
        return self.status.is_terminal


@runtime_checkable
class JobStore(Protocol):
    """Where a client keeps its jobs (see the module docstring).

    ``save`` writes records (insert or replace by ``id``) and returns once they are durable;
    ``load`` returns every record held, ended ones included. ``open`` and ``aclose`` bracket
    the client's life. A store may be shared by several clients of one account.
    """

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def save(self, records: Iterable[JobRecord]) -> None: ...

    async def load(self) -> list[JobRecord]: ...


class MemoryJobStore:
    """The in-process default: records live as long as the store object does.

    Useful to hand one store to successive clients in one process (a client reopened after an
    outage finds its jobs), and as the reference the other stores are tested against.
    """

    def __init__(self) -> None:
        self._records: dict[str, JobRecord] = {}

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def save(self, records: Iterable[JobRecord]) -> None:
        for record in records:
            self._records[record.id] = record

    async def load(self) -> list[JobRecord]:
        return list(self._records.values())
