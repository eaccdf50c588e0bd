"""Jobs and their progress: each job's state, and the async iterators that report it.

Every status change of a job is pushed, at once and without awaiting, into the buffer of each
iterator listening: the poller that saw the change never waits for a consumer, and nothing is
dropped (a job changes status at most a handful of times, so buffers stay small). Iterators end
after the job's terminal change, or when the client closes.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
import attrs

from kling_async._errors import ClientClosedError, TaskFailedError
from kling_async.protocol.models import Task, TaskStatus, Text2VideoRequest

if TYPE_CHECKING:
    from kling_async.protocol.schedule import ClassKey

__all__ = ["EventHub", "Job", "JobEvent", "JobStatus", "as_completed"]

T = TypeVar("T")


class JobStatus(enum.StrEnum):
    """Where a job stands: Kling's task statuses plus the client-side ones around them."""

    QUEUED = "queued"  # waiting behind the client's limits
    SUBMITTING = "submitting"  # create in flight
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
    """A status change: ``status`` is the job's new status and ``task`` the new snapshot, or
    None for a job that ended without one (rejected before submission: ``job.error`` says
    why)."""

    job: Job
    task: Task | None
    status: JobStatus


class Job:
    """One clip on its way: queued, submitted, followed until it ends.

    ``task_id`` and ``external_task_id`` are set as soon as known; persist them to resume with
    :meth:`KlingClient.track` after a restart. ``task`` is the latest snapshot (or None).
    """

    __slots__ = (
        "_done_callbacks",
        "_feeds",
        "_hub",
        "_status",
        "class_key",
        "ended_at",
        "error",
        "external_task_id",
        "measured",
        "poll_age",
        "poll_token",
        "possible_duplicate",
        "request",
        "started_at",
        "task",
        "task_id",
    )

    def __init__(
        self,
        hub: EventHub,
        *,
        request: Text2VideoRequest | None = None,
        task_id: str | None = None,
        external_task_id: str | None = None,
        class_key: ClassKey = ("", "", ""),
    ) -> None:
        self._hub = hub
        self.request = request
        self.task_id = task_id
        self.external_task_id = external_task_id
        self.task: Task | None = None
        self.error: BaseException | None = None
        #: True only where the backend may hold two tasks for this job: its create was sent
        #: again after an outcome no lookup could settle, on a backend that may accept a
        #: repeated external_task_id. ``task`` is the one this job follows.
        self.possible_duplicate = False
        self._status = JobStatus.QUEUED
        self._feeds: list[_Feed[Task]] | None = None
        self._done_callbacks: list[Callable[[Job], None]] | None = None
        self.class_key = class_key
        # Poll bookkeeping, owned by the poller pool (monotonic seconds).
        self.started_at = 0.0
        self.measured = False  # True when started_at is our own submission time
        self.poll_age = 0.0
        self.poll_token = 0
        self.ended_at: float | None = None

    def __repr__(self) -> str:
        return (
            f"Job(task_id={self.task_id!r}, external_task_id={self.external_task_id!r}, "
            f"status={self._status.value!r})"
        )

    @property
    def status(self) -> JobStatus:
        return self._status

    @property
    def done(self) -> bool:
        return self._status.is_terminal

    # --- state changes, called by the engine --------------------------------------------------

    def _set_status(self, status: JobStatus) -> None:
        self._status = status

    def _observe(self, task: Task) -> bool:
        """Record a snapshot; True if it changed the status (and was announced)."""
        if self.done:
            return False
        self.task = task
        self.task_id = task.task_id
        if task.external_task_id and not self.external_task_id:
            self.external_task_id = task.external_task_id
        status = JobStatus.of(task.status)
        if status is self._status:
            return False
        self._status = status
        self._announce(task)
        return True

    def _fail(self, error: BaseException) -> None:
        """End the job without a result (the task, if any, is kept on ``.task``)."""
        if self.done:
            return
        self.error = error
        self._status = JobStatus.ERROR
        # The snapshot is not new: updates() already had it, so only the event carries it.
        self._announce(self.task, new_snapshot=False)

    def _announce(self, task: Task | None, *, new_snapshot: bool = True) -> None:
        if new_snapshot and task is not None and self._feeds:
            for feed in self._feeds:
                feed.push(task)
        self._hub.publish(JobEvent(self, task, self._status))
        if self.done:
            self._settle()

    def _settle(self) -> None:
        for feed in self._feeds or ():
            feed.close()
        callbacks, self._done_callbacks = self._done_callbacks, None
        for callback in callbacks or ():
            callback(self)

    def _on_done(self, callback: Callable[[Job], None]) -> None:
        if self.done:
            callback(self)
        else:
            self._done_callbacks = [*(self._done_callbacks or ()), callback]

    def _remove_done_callback(self, callback: Callable[[Job], None]) -> None:
        if self._done_callbacks and callback in self._done_callbacks:
            self._done_callbacks.remove(callback)

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
            f"job {self.task_id or self.external_task_id} has not ended "
            f"(status {self._status.value}); the client closed before it did"
        )

    async def wait(self) -> Task:
        """The terminal task. Raises :class:`TaskFailedError` if the task failed, the job's
        error if it never produced a task, :class:`ClientClosedError` if the client closed."""
        if not self.done and not self._hub.closed:
            feed: _Feed[Task] = _Feed()
            self._attach(feed)
            try:
                while not feed.closed:
                    await feed.wait()
            finally:
                self._detach(feed)
        return self.result()

    def _attach(self, feed: _Feed[Task]) -> None:
        self._feeds = [*(self._feeds or ()), feed]
        self._hub.listening.add(feed)

    def _detach(self, feed: _Feed[Task]) -> None:
        if self._feeds and feed in self._feeds:
            self._feeds.remove(feed)
            if not self._feeds:
                self._feeds = None
        self._hub.listening.discard(feed)

    def updates(self) -> AsyncIterator[Task]:
        """Each status change once, in order, starting with the current snapshot; ends after
        the terminal one (or when the client closes). Listening starts at the call, so no
        change between the call and the first iteration is missed."""
        feed: _Feed[Task] = _Feed()
        if self.task is not None:
            feed.items.append(self.task)
        if self.done or self._hub.closed:
            feed.close()
        else:
            self._attach(feed)
        return self._drain(feed)

    async def _drain(self, feed: _Feed[Task]) -> AsyncIterator[Task]:
        try:
            async for task in feed:
                yield task
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
        return self._drain(feed)

    async def _drain(self, feed: _Feed[JobEvent]) -> AsyncIterator[JobEvent]:
        try:
            async for event in feed:
                yield event
        finally:
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
