"""Jobs and their progress: each job's state, and the async iterators that report it.

Every status change of a job is pushed, at once and without awaiting, into the buffer of each
iterator listening: the poller that saw the change never waits for a consumer, and nothing is
dropped (a job changes status at most a handful of times, so buffers stay small). Iterators end
after the job's terminal change, or when the client closes.
"""

from __future__ import annotations

import enum
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import anyio
import attrs

from kling_async._errors import (
    ClientClosedError,
    RestoredError,
    TaskFailedError,
)
from kling_async.protocol.models import Task, TaskStatus, Text2VideoRequest

__all__ = [
    "EventHub",
    "error_message",
    "shared_monotonic",
    "error_type",
    "Job",
    "JobEvent",
    "JobStatus",
    "as_completed",
]

T = TypeVar("T")


class JobStatus(enum.StrEnum):
    """Where a job stands: Kling's task statuses plus the client-side ones around them."""

    QUEUED = "queued"  # waiting behind the client's limits
    SUBMITTING = "submitting"  # holding a slot, its create on its way
    SUBMITTED = "submitted"
    PROCESSING = "processing"
    SUCCEEDED = "succeed"
    FAILED = "failed"  # the task ran and failed
    UNKNOWN = "unknown"  # a status Kling added after this SDK
    ERROR = "error"  # ended without a result: rejected, account stopped, lost; see job.error

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.ERROR)

    @classmethod
    def of(cls, status: TaskStatus) -> JobStatus:
        return _JOB_STATUS_OF[status]


_JOB_STATUS_OF: dict[TaskStatus, JobStatus] = {s: JobStatus(s.value) for s in TaskStatus}


class _Feed(Generic[T]):
    """One listener's buffer: appended to without waiting, drained by one async iterator."""

    __slots__ = ("_event", "closed", "items")

    def __init__(self) -> None:
        self.items: deque[T] = deque()
        self._event = anyio.Event()
        self.closed = False

    def push(self, item: T) -> None:
        self.items.append(item)
        self._event.set()

    def close(self) -> None:
        self.closed = True
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = anyio.Event()

    async def __aiter__(self) -> AsyncIterator[T]:
        """Drain the buffer, waiting for more, until closed and empty."""
        while True:
            while self.items:
                yield self.items.popleft()
            if self.closed:
                return
            await self.wait()


@attrs.frozen
class JobEvent:
    """One state change of a job: ``status`` is the job's new status, ``task`` the snapshot at
    that moment (None before the job has a task, and for a job that ended without one, where
    ``error`` says why) and ``error`` the error a job ended with (else None)."""

    job: Job
    task: Task | None
    status: JobStatus
    error: BaseException | None = None


def error_type(error: BaseException) -> str:
    """The class name an error is reported under (a restored one keeps its original)."""
    return error.error_type if isinstance(error, RestoredError) else type(error).__name__


def error_message(error: BaseException) -> str:
    return error.message if isinstance(error, RestoredError) else str(error)


class _Clock:
    """Instants to the millisecond, one float for all the jobs of one burst.

    A job keeps when it was made and when it last changed for the client's whole life (and
    its engine record when its task started, on the monotonic clock), and jobs are made and
    changed in bursts (a ``submit_many``, 1,000 ``track`` calls, the 500 tasks of a list
    page): a reading within a millisecond of the last one gives that one back, the same
    float, so a burst shares one where each job would hold its own (24 bytes each). A clock
    that steps back is read afresh.
    """

    __slots__ = ("last", "read")

    def __init__(self, read: Callable[[], float]) -> None:
        self.read = read
        self.last = 0.0

    def now(self) -> float:
        now = self.read()
        last = self.last
        if 0.0 <= now - last < 0.001:
            return last
        self.last = now
        return now


_clock = _Clock(time.time)
#: ``time.monotonic()``, shared by a burst the same way (see ``_Clock``).
shared_monotonic = _Clock(time.monotonic).now


def _utc(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


class _Untold:
    """The state of a job that follows a task created elsewhere, before its first snapshot:
    it was never queued here, so ``updates()`` has nothing to start with."""

    __slots__ = ()


_UNTOLD = _Untold()


class Job:
    """One clip on its way: queued, submitted, followed until it ends.

    ``id`` is the job's id, stable from the moment it is submitted (its ``external_task_id``;
    for a job that follows a task created elsewhere, the task id): persist it, or the
    ``task_id`` once known, to find the job again with :meth:`KlingClient.job` or to resume it
    with :meth:`KlingClient.track` after a restart. ``task`` is the latest snapshot (or None),
    ``error`` what a job that ended without a result ended with. Jobs are made by the client
    (:meth:`KlingClient.submit`, :meth:`KlingClient.track`), never directly.
    """

    # A job is kept for the client's life, so it holds little: timestamps as floats (the
    # datetimes are made when read), the end as the last update of an ended job, the task
    # of its last change instead of the event (made again when ``updates()`` starts), and
    # one list for whatever waits on it.
    __slots__ = (
        "_engine",
        "_hub",
        "_made",
        "_status",
        "_told",
        "_updated",
        "_waiting",
        "error",
        "external_task_id",
        "id",
        "possible_duplicate",
        "request",
        "task",
        "task_id",
    )

    def __init__(
        self,
        hub: EventHub,
        job_id: str,
        *,
        request: Text2VideoRequest | None = None,
        task_id: str | None = None,
        external_task_id: str | None = None,
        engine: object = None,
        announce: bool = True,
    ) -> None:
        self._hub = hub
        #: The job's id, stable from submission: its ``external_task_id`` (or, for a job that
        #: follows a task created elsewhere, the task id).
        self.id = job_id
        #: What was asked for (None for a job that follows a task created elsewhere).
        self.request = request
        #: Kling's id of the job's task, once known.
        self.task_id = task_id
        #: The id the job's task is created with (and can be looked up by).
        self.external_task_id = external_task_id
        #: The latest snapshot of the job's task, or None before it has one.
        self.task: Task | None = None
        #: What a job that ended without a result ended with (else None).
        self.error: BaseException | None = None
        #: True only where the backend may hold two tasks for this job: its create was sent
        #: again after an outcome no lookup could settle, on a backend that may accept a
        #: repeated external_task_id. ``task`` is the one this job follows.
        self.possible_duplicate = False
        self._status = JobStatus.QUEUED
        #: The feeds of ``updates()`` and ``wait()`` (pushed every change) and the callbacks
        #: of ``as_completed()`` (called at the end), or None while nothing waits.
        self._waiting: list[_Feed[JobEvent] | Callable[[Job], None]] | None = None
        #: The engine's own record of this job (schedule, slot, create state): not public.
        self._engine = engine
        self._made = self._updated = _clock.now()
        #: The task of the state ``updates()`` starts with (see ``_last``).
        self._told: Task | _Untold | None = None if announce else _UNTOLD

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, task_id={self.task_id!r}, status={self._status.value!r})"

    @property
    def status(self) -> JobStatus:
        """Where the job stands: ``queued``, ``submitting``, the task's statuses, or ``error``."""
        return self._status

    @property
    def done(self) -> bool:
        """True once the job has ended (succeeded, failed or error)."""
        return self._status.is_terminal

    @property
    def created_at(self) -> datetime:
        """When the job was made (submitted, tracked or loaded), UTC."""
        created = _utc(self._made)
        assert created is not None
        return created

    @property
    def updated_at(self) -> datetime:
        """When the job's state last changed, UTC."""
        updated = _utc(self._updated)
        assert updated is not None
        return updated

    @property
    def ended_at(self) -> datetime | None:
        """When this client saw the job end, UTC (None while it runs)."""
        return _utc(self._ended)

    @property
    def _ended(self) -> float | None:
        # An ended job never changes again: its last update is its end.
        return self._updated if self._status.is_terminal else None

    @property
    def _last(self) -> JobEvent | None:
        """The state ``updates()`` starts with: the last change, as an event. None for a job
        that follows a task created elsewhere, until its first snapshot (it never was queued
        here)."""
        told = self._told
        if isinstance(told, _Untold):
            return None
        return JobEvent(self, told, self._status, self.error)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready snapshot of the job, for web apps and logs: ids, status, the request
        and the latest task (through the one converter), the error's type and message (free
        of secrets), and ISO 8601 timestamps."""
        error, ended = self.error, self.ended_at
        return {
            "id": self.id,
            "status": self._status.value,
            "task_id": self.task_id,
            "external_task_id": self.external_task_id,
            "possible_duplicate": self.possible_duplicate,
            "request": None if self.request is None else self.request.to_dict(),
            "task": None if self.task is None else self.task.to_dict(),
            "error": (
                None
                if error is None
                else {"type": error_type(error), "message": error_message(error)}
            ),
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "ended_at": None if ended is None else ended.isoformat(),
        }

    # --- state changes, made by the engine's tracker only ---------------------------------

    def _restore(self, status: JobStatus, made: float, updated: float) -> None:
        """Take the state a job store saved (nothing is announced: nothing changed)."""
        self._status = status
        self._made = made or self._made
        self._updated = updated or self._updated
        self._told = self.task

    def _change(self, status: JobStatus, task: Task | None, *, at: float | None = None) -> None:
        """Move to ``status`` and announce it (to ``updates()``, ``events()`` and, at the
        end, to ``wait()`` and ``as_completed()``)."""
        self._status = status
        self._updated = _clock.now() if at is None else at
        self._told = task
        waiting, hub = self._waiting, self._hub
        if waiting or hub._subscribers:  # an event only for someone to see it
            event = JobEvent(self, task, status, self.error)
            for feed in waiting or ():
                if isinstance(feed, _Feed):
                    feed.push(event)
            hub.publish(event)
        if status.is_terminal:
            self._settle()

    def _settle(self) -> None:
        waiting, self._waiting = self._waiting, None
        for feed in waiting or ():
            if isinstance(feed, _Feed):
                feed.close()
        for callback in waiting or ():
            if not isinstance(callback, _Feed):
                callback(self)

    def _on_done(self, callback: Callable[[Job], None]) -> None:
        if self.done:
            callback(self)
        else:
            self._waiting = [*(self._waiting or ()), callback]

    def _remove_done_callback(self, callback: Callable[[Job], None]) -> None:
        self._forget(callback)

    def _forget(self, waiter: _Feed[JobEvent] | Callable[[Job], None]) -> None:
        waiting = self._waiting
        if waiting and waiter in waiting:
            waiting.remove(waiter)
            if not waiting:
                self._waiting = None

    # --- consumers ---------------------------------------------------------------------------

    def result(self) -> Task:
        """The final task of a finished job; raises as :meth:`wait` does."""
        if self._status is JobStatus.SUCCEEDED and self.task is not None:
            return self.task
        if self._status is JobStatus.FAILED and self.task is not None:
            raise TaskFailedError(self.task)
        if self._status is JobStatus.ERROR and self.error is not None:
            raise self.error
        raise ClientClosedError(
            f"job {self.id} has not ended (status {self._status.value}); "
            "the client closed before it did"
        )

    async def wait(self) -> Task:
        """The terminal task. Raises :class:`TaskFailedError` if the task failed, the job's
        error if it never produced a task, :class:`ClientClosedError` if the client closed."""
        if not self.done and not self._hub.closed:
            feed: _Feed[JobEvent] = _Feed()
            self._attach(feed)
            try:
                while not feed.closed:
                    await feed.wait()
            finally:
                self._detach(feed)
        return self.result()

    def _attach(self, feed: _Feed[JobEvent]) -> None:
        self._waiting = [*(self._waiting or ()), feed]
        self._hub.listening.add(feed)

    def _detach(self, feed: _Feed[JobEvent]) -> None:
        self._forget(feed)
        self._hub.listening.discard(feed)

    def updates(self) -> AsyncIterator[JobEvent]:
        """Each state change once, in order, starting with the current state (``queued`` for
        a job just submitted); ends after the terminal one (or when the client closes).
        Listening starts at the call, so no change between the call and the first iteration
        is missed."""
        feed: _Feed[JobEvent] = _Feed()
        last = self._last
        if last is not None:
            feed.items.append(last)
        if self.done or self._hub.closed:
            feed.close()
        else:
            self._attach(feed)
        return self._drain(feed)

    async def _drain(self, feed: _Feed[JobEvent]) -> AsyncIterator[JobEvent]:
        try:
            async for event in feed:
                yield event
        finally:
            self._detach(feed)


class EventHub:
    """Fans every job's status changes out to the ``client.events()`` listeners, and ends
    every waiting iterator when the client closes."""

    def __init__(self) -> None:
        self._subscribers: list[_Feed[JobEvent]] = []
        #: Every feed someone is waiting on, so that closing the client can end them all.
        self.listening: set[_Feed[Any]] = set()
        self.closed = False

    def publish(self, event: JobEvent) -> None:
        for feed in self._subscribers:
            feed.push(event)

    def events(self) -> AsyncIterator[JobEvent]:
        """Every event from this call on (listening starts now, not at the first iteration)."""
        feed: _Feed[JobEvent] = _Feed()
        if self.closed:
            feed.close()
        else:
            self._subscribers.append(feed)
            self.listening.add(feed)
        iterator = self._drain(feed)
        # An iterator dropped without being iterated never runs its ``finally``: without this
        # its buffer would stay subscribed, and grow with every event, for the client's life.
        weakref.finalize(iterator, self._unsubscribe, feed)
        return iterator

    async def _drain(self, feed: _Feed[JobEvent]) -> AsyncIterator[JobEvent]:
        try:
            async for event in feed:
                yield event
        finally:
            self._unsubscribe(feed)

    def _unsubscribe(self, feed: _Feed[JobEvent]) -> None:
        if feed in self._subscribers:
            self._subscribers.remove(feed)
        self.listening.discard(feed)

    def close(self) -> None:
        self.closed = True
        for feed in list(self.listening):
            feed.close()


def as_completed(hub: EventHub, jobs: Iterable[Job]) -> AsyncIterator[Job]:
    """Yield each job as it ends, in the order they end; stop early if the client closes.

    Listening starts at the call: a job that ends before the first iteration is not missed.
    """
    pending = list(dict.fromkeys(jobs))
    feed: _Feed[Job] = _Feed()
    left = len(pending)

    def finished(job: Job) -> None:
        nonlocal left
        feed.push(job)
        left -= 1
        if not left:
            feed.close()

    for job in pending:
        job._on_done(finished)
    if not pending or hub.closed:
        feed.close()
    elif not feed.closed:
        hub.listening.add(feed)
    return _drain_completed(hub, feed, pending, finished)


async def _drain_completed(
    hub: EventHub, feed: _Feed[Job], pending: list[Job], finished: Callable[[Job], None]
) -> AsyncIterator[Job]:
    try:
        async for job in feed:
            yield job
    finally:
        hub.listening.discard(feed)
        for job in pending:
            job._remove_done_callback(finished)
