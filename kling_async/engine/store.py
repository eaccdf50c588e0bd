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

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol, runtime_checkable

import anyio
import attrs

from kling_async._errors import JobStoreError
from kling_async.engine.jobs import Job, JobStatus
from kling_async.protocol.models import Task, Text2VideoRequest
from kling_async.protocol.schedule import ClassKey, DurationSummary

__all__ = ["JobRecord", "JobStore", "MemoryJobStore", "StoreWriter"]

log = logging.getLogger("kling_async")


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, through the request's and the task's own ``to_dict()`` (the one
        converter), for stores that keep records as JSON."""
        return {
            "id": self.id,
            "request": None if self.request is None else self.request.to_dict(),
            "task_id": self.task_id,
            "status": self.status.value,
            "task": None if self.task is None else self.task.to_dict(),
            "sent": self.sent,
            "possible_duplicate": self.possible_duplicate,
            "error": self.error,
            "error_type": self.error_type,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobRecord:
        """The record :meth:`to_dict` made, also when a later version wrote it: an unknown
        status reads as ``UNKNOWN`` (followed again, not taken as ended) and an unknown
        request field is kept in ``extra`` (sent as that version would send it)."""
        request, task = data.get("request"), data.get("task")
        return cls(
            id=str(data["id"]),
            request=None if request is None else stored_request(dict(request)),
            task_id=data.get("task_id"),
            status=stored_status(str(data.get("status", JobStatus.QUEUED.value))),
            task=None if task is None else Task.from_dict(task),
            sent=bool(data.get("sent", False)),
            possible_duplicate=bool(data.get("possible_duplicate", False)),
            error=data.get("error"),
            error_type=data.get("error_type"),
            created_at=float(data.get("created_at") or 0.0),
            updated_at=float(data.get("updated_at") or 0.0),
        )


def stored_status(value: str) -> JobStatus:
    """A status this version does not know (written by a later one) reads as ``UNKNOWN``:
    not ended, so the job is followed again rather than taken as finished."""
    try:
        return JobStatus(value)
    except ValueError:
        return JobStatus.UNKNOWN


_REQUEST_FIELDS: Final = frozenset(field.name for field in attrs.fields(Text2VideoRequest))


def stored_request(data: dict[str, Any]) -> Text2VideoRequest:
    """A stored request; a field a later version added (and this one does not know) is kept
    in ``extra``, which sends it to the server under its own name as that version would,
    rather than refused (``from_dict`` refuses unknown keys) or dropped from a resubmission."""
    unknown = {key: data.pop(key) for key in list(data) if key not in _REQUEST_FIELDS}
    if unknown:
        data["extra"] = {**unknown, **(data.get("extra") or {})}
    return Text2VideoRequest.from_dict(data)


@runtime_checkable
class JobStore(Protocol):
    """Where a client keeps its jobs (see the module docstring).

    ``save`` writes records (insert or replace by ``id``) and returns once they are durable;
    ``load`` returns every record held, ended ones included. The store's owner opens and
    closes it: a client given a store object uses it and leaves it open (a client given a
    path makes its own ``SQLiteJobStore`` and closes it). A store may outlive many clients.
    """

    async def save(self, records: Iterable[JobRecord]) -> None: ...

    async def load(self) -> list[JobRecord]: ...


class MemoryJobStore:
    """The in-process default: records (and learned durations, as a
    :class:`~kling_async.engine.durations.DurationStore`) live as long as the store object does.

    Useful to hand one store to successive clients in one process (a client reopened after an
    outage finds its jobs), and as the reference the other stores are tested against.
    """

    def __init__(self) -> None:
        self._records: dict[str, JobRecord] = {}
        self._durations: dict[ClassKey, DurationSummary] = {}

    async def save(self, records: Iterable[JobRecord]) -> None:
        for record in records:
            self._records[record.id] = record

    async def load(self) -> list[JobRecord]:
        return list(self._records.values())

    # --- learned durations (a DurationStore too) -------------------------------------------

    async def load_durations(self) -> dict[ClassKey, DurationSummary]:
        return dict(self._durations)

    async def save_durations(self, summaries: Mapping[ClassKey, DurationSummary]) -> None:
        self._durations.update(summaries)

    async def forget_durations(self) -> None:
        self._durations.clear()


class StoreWriter:
    """Writes changed jobs to a :class:`JobStore` from the client's task group.

    Changes are coalesced per job (a job that changed three times since the last write is
    written once, as it is now), so the pollers never wait for the store. :meth:`durable`
    is for the one write that must land before the engine goes on (the mark before a
    create): it waits through a few failed attempts (a briefly locked file) and raises
    :class:`JobStoreError` only once the store has failed that many times in a row. A failing
    store is retried with a growing pause and logged; the jobs stay in memory meanwhile. A
    batch the store refuses is written again one record at a time, so one record it cannot
    take is dropped (and logged) instead of blocking every other.
    """

    #: Failed writes in a row after which :meth:`durable` gives up.
    DURABLE_ATTEMPTS = 4
    #: A record refused alone this many times is dropped.
    RECORD_ATTEMPTS = 3
    #: How long closing may spend writing what is left.
    FLUSH_TIMEOUT = 10.0

    def __init__(self, store: JobStore, record: Callable[[Job], JobRecord]) -> None:
        self.store = store
        self._record = record
        self._dirty: dict[str, Job] = {}
        self._wake = anyio.Event()
        #: Writes started so far, and the last one finished (a job is durable once a write
        #: that started after its change has finished).
        self._started = 0
        self._finished = 0
        self._done = anyio.Event()
        self._error: BaseException | None = None
        self._failures = 0
        self._refusals: dict[str, int] = {}

    def touch(self, job: Job) -> None:
        self._dirty[job.id] = job
        self._wake.set()

    async def durable(self, job: Job) -> None:
        """Return once ``job`` as it is now is in the store."""
        self.touch(job)
        target = self._started + 1
        while self._finished < target:
            done = self._done
            await done.wait()
            if (
                self._finished < target
                and self._error is not None
                and self._failures >= self.DURABLE_ATTEMPTS
            ):
                raise JobStoreError(
                    f"the job store could not record job {job.id} "
                    f"({type(self._error).__name__}: {self._error})"
                )

    async def run(self) -> None:
        while True:
            if not self._dirty:
                self._wake = anyio.Event()
                await self._wake.wait()
            try:
                await self._write()
            except Exception as exc:
                self._failures += 1
                self._error = exc
                self._signal()
                log.error(  # noqa: TRY400 (one line per failure, not a traceback each)
                    "the job store failed (%s: %s); writing again shortly",
                    type(exc).__name__,
                    exc,
                )
                await anyio.sleep(min(30.0, 0.05 * 2 ** min(self._failures, 10)))
            else:
                self._failures = 0
                self._error = None

    async def _write(self) -> None:
        if not self._dirty:
            return
        batch, self._dirty = self._dirty, {}
        self._started += 1
        try:
            if self._failures and len(batch) > 1:
                await self._write_one_by_one(batch)
            else:
                await self.store.save([self._record(job) for job in batch.values()])
        except BaseException:
            # Not written: those jobs are written with the next batch (newer changes win).
            self._dirty = {**batch, **self._dirty}
            raise
        self._finish()

    async def _write_one_by_one(self, batch: dict[str, Job]) -> None:
        """After a failure: find the record the store refuses, and write the others."""
        failed: BaseException | None = None
        for job_id, job in list(batch.items()):
            try:
                await self.store.save([self._record(job)])
            except Exception as exc:
                refusals = self._refusals[job_id] = self._refusals.get(job_id, 0) + 1
                if refusals >= self.RECORD_ATTEMPTS:
                    log.error(  # noqa: TRY400 (the store's reason is in the line)
                        "the job store refused job %s %d times (%s); its record is not written",
                        job_id,
                        refusals,
                        exc,
                    )
                    del self._refusals[job_id]
                else:
                    failed = exc
                    continue
            else:
                self._refusals.pop(job_id, None)
            del batch[job_id]
        if failed is not None:
            raise failed

    def _finish(self) -> None:
        self._finished = self._started
        self._signal()

    def _signal(self) -> None:
        done, self._done = self._done, anyio.Event()
        done.set()

    async def flush(self) -> None:
        """Write what is left (the client is closing): shielded, so a cancelled scope still
        leaves the store as current as the jobs, and bounded, so a hung store cannot hang
        the close."""
        with anyio.move_on_after(self.FLUSH_TIMEOUT, shield=True) as scope:
            for _ in range(self.DURABLE_ATTEMPTS):
                if not self._dirty:
                    return
                try:
                    await self._write()
                except Exception:
                    self._failures += 1
                    log.exception("the job store failed while closing")
        if self._dirty or scope.cancelled_caught:
            log.error(
                "the job store did not take the last changes of %d jobs before closing",
                len(self._dirty),
            )
