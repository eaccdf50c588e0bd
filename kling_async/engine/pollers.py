"""The poller pool: a few coroutines serving one schedule for every task the client follows.

One heap keyed by next poll time replaces a sleeping coroutine per task, so following 100,000
tasks costs a heap entry each, not a task each. A task's next poll comes from its class's
``DurationModel`` (:mod:`kling_async.protocol.schedule`), which learns from every task of
the class that ends.
Where the backend has the list endpoint and many tasks are active, one list sweep (500 tasks a
page) can stand in for hundreds of single GETs.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
import time
from collections.abc import Callable

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from kling_async._errors import (
    AccountError,
    AuthenticationError,
    InvalidRequestError,
    KlingError,
    TaskNotFoundError,
    UnreachableError,
)
from kling_async.engine.jobs import Job
from kling_async.http.resources import TaskResource
from kling_async.protocol.models import Task
from kling_async.protocol.poll import PollPolicy
from kling_async.protocol.schedule import ClassKey, DurationModel

__all__ = ["PollerPool"]

log = logging.getLogger("kling_async")

_PAGE_SIZE = 500
_MAX_PAGE = 1000  # the list endpoint's pageNum range is 1..1000
#: A task reported missing this many times in a row is given up (fresh tasks may lag the index).
_MISSES_ALLOWED = 3
#: Poll rounds (each already retried) that may fail in a row before a job ends with the error,
#: and only once the failures have lasted this many ``max_interval``\ s: a storm of transient
#: errors must not end jobs whose tasks are running fine.
_FAILURES_ALLOWED = 10
_FAILING_INTERVALS = 10
#: Tasks of a list page applied between two yields to the event loop.
_YIELD_EVERY = 100


class PollerPool:
    """Follows jobs that have a ``task_id`` until they end; see the module docstring."""

    # The heap holds (due, sequence, token, job); an entry whose token is no longer the job's
    # was superseded by a later schedule and is skipped when it comes up.

    def __init__(
        self,
        resource: TaskResource,
        policy: PollPolicy,
        *,
        on_end: Callable[[Job], None],
        list_sweep: bool = False,
        sweep_threshold: int = 20,
        rng: random.Random | None = None,
    ) -> None:
        self._resource = resource
        self.policy = policy
        self._on_end = on_end
        self._list_sweep = list_sweep
        self._sweep_threshold = sweep_threshold
        self._rng = rng or random.Random()
        self._heap: list[tuple[float, int, int, Job]] = []
        self._seq = itertools.count()
        self._wakeup = anyio.Event()
        self._models: dict[ClassKey, DurationModel] = {}
        self._misses: dict[Job, int] = {}
        #: When each job's current run of failed polls began.
        self._failing_since: dict[Job, float] = {}
        self._sweeping: anyio.Event | None = None
        self._last_sweep = -math.inf
        #: Jobs the last sweep looked for and did not find: they are polled one by one.
        self._missed_by_sweep: set[Job] = set()
        self._sweep_failures = 0
        self._sweeps_paused_until = -math.inf
        #: task_id -> job, for every job being followed.
        self.following: dict[str, Job] = {}
        self.polls = 0
        self.sweeps = 0

    # --- scheduling ------------------------------------------------------------------------

    def model(self, key: ClassKey) -> DurationModel:
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = self.policy.duration_model()
        return model

    def follow(self, job: Job, *, poll_now: bool = False) -> None:
        """Start following ``job`` (which has a task_id and ``started_at``)."""
        assert job.task_id is not None
        self.following[job.task_id] = job
        if poll_now:
            due = time.monotonic()
        else:
            due = job.started_at + self.model(job.class_key).next_age(0.0)
        self._schedule(job, due)

    def _schedule(self, job: Job, due: float) -> None:
        job.poll_token += 1
        was_first = not self._heap or due < self._heap[0][0]
        heapq.heappush(self._heap, (due, next(self._seq), job.poll_token, job))
        if was_first:
            self._wakeup.set()

    def _schedule_next(self, job: Job, age: float) -> None:
        gap = self.model(job.class_key).next_age(age) - age
        gap = max(self.policy.min_interval * 0.5, self.policy.jittered(gap, self._rng))
        self._schedule(job, time.monotonic() + gap)

    async def _sleep(self, seconds: float | None) -> None:
        event = self._wakeup
        with anyio.move_on_after(seconds):
            await event.wait()
        if event.is_set() and self._wakeup is event:
            self._wakeup = anyio.Event()

    # --- the workers -----------------------------------------------------------------------

    async def run(self, workers: int) -> None:
        """Serve the schedule: one dispatcher sleeps until the next poll is due and hands it
        to the first free of ``workers`` pollers, so a schedule change wakes one coroutine,
        not all of them, and a busy pool holds due polls back instead of piling them up."""
        send, receive = anyio.create_memory_object_stream[tuple[Job, int]](0)
        async with anyio.create_task_group() as tg, send, receive:
            for _ in range(workers):
                tg.start_soon(self._work, receive.clone(), name="kling-poller")
            await self._dispatch(send)

    async def _dispatch(self, send: MemoryObjectSendStream[tuple[Job, int]]) -> None:
        heap = self._heap
        while True:
            if not heap:
                await self._sleep(None)
                continue
            due, _, token, job = heap[0]
            delay = due - time.monotonic()
            if delay > 0:
                await self._sleep(delay)
                continue
            heapq.heappop(heap)
            if token == job.poll_token and not job.done:
                await send.send((job, token))

    async def _work(self, receive: MemoryObjectReceiveStream[tuple[Job, int]]) -> None:
        async with receive:
            async for job, token in receive:
                if self._sweeping is not None:
                    # A sweep in flight is about to look at this task too; see what it finds.
                    await self._sweeping.wait()
                if token != job.poll_token or job.done:
                    continue
                try:
                    await self._serve(job)
                except Exception:
                    # A bug must not take every other task down with it: log it loudly and
                    # keep following this task, more slowly.
                    log.exception("following task %s failed unexpectedly", job.task_id)
                    if not job.done:
                        self._schedule(job, time.monotonic() + self.policy.max_interval)

    async def _serve(self, job: Job) -> None:
        if not self._sweeping_on() or job in self._missed_by_sweep:
            await self._poll(job)
        elif (wait := self._last_sweep + self.policy.min_interval - time.monotonic()) > 0:
            # A sweep covers everyone soon: it is cheaper than a poll of its own.
            self._schedule(job, time.monotonic() + wait)
        else:
            await self._sweep(job)

    def _sweeping_on(self) -> bool:
        return (
            self._list_sweep
            and len(self.following) >= self._sweep_threshold
            and time.monotonic() >= self._sweeps_paused_until
        )

    async def _poll(self, job: Job) -> None:
        assert job.task_id is not None
        self.polls += 1
        try:
            task = await self._resource.get(job.task_id)
        except TaskNotFoundError as exc:
            misses = self._misses[job] = self._misses.get(job, 0) + 1
            if misses >= _MISSES_ALLOWED:
                self._end(job, exc)
            else:
                self._schedule(job, time.monotonic() + self.policy.min_interval * 2**misses)
            return
        except (AuthenticationError, AccountError, InvalidRequestError, UnreachableError) as exc:
            # A verdict about this task, this account or the host: asking again cannot
            # change it (an unreachable host's jobs keep their task_id for track()).
            self._end(job, exc)
            return
        except KlingError as exc:
            # Retries for this poll ran out; the task is not lost, just looked at later (with
            # a growing gap, so an outage costs few requests and recovery is seen soon), and
            # given up (its task_id kept on the job) only after many such rounds in a row.
            failures = self._misses[job] = self._misses.get(job, 0) + 1
            since = self._failing_since.setdefault(job, time.monotonic())
            lasted = time.monotonic() - since
            if (
                failures >= _FAILURES_ALLOWED
                and lasted >= _FAILING_INTERVALS * self.policy.max_interval
            ):
                self._end(job, exc)
                return
            log.warning("poll of task %s failed (%s); trying again later", job.task_id, exc)
            gap = min(self.policy.max_interval, self.policy.min_interval * 2**failures)
            self._schedule(job, time.monotonic() + gap)
            return
        self._misses.pop(job, None)
        self._failing_since.pop(job, None)
        self._apply(job, task, time.monotonic())

    def _apply(self, job: Job, task: Task, observed_at: float) -> None:
        if job.task_id is None or self.following.get(job.task_id) is not job:
            return  # already finished (a sweep and a poll can both see the end)
        job._observe(task)
        age = observed_at - job.started_at
        if task.is_terminal:
            if job.measured:
                # It ended between the previous poll and this one: take the midpoint.
                self.model(job.class_key).observe((job.poll_age + age) / 2)
            self._finish(job)
        else:
            job.poll_age = age
            self._schedule_next(job, age)

    def _end(self, job: Job, error: BaseException) -> None:
        if job.task_id is None or self.following.get(job.task_id) is not job:
            return
        job._fail(error)
        self._finish(job)

    def _finish(self, job: Job) -> None:
        job.ended_at = time.monotonic()
        if job.task_id is not None:
            self.following.pop(job.task_id, None)
        self._misses.pop(job, None)
        self._failing_since.pop(job, None)
        self._missed_by_sweep.discard(job)
        self._on_end(job)

    async def _sweep(self, trigger: Job) -> None:
        """Look at every followed task through the list endpoint (500 tasks a page).

        The list is newest first and may hold many tasks that are not ours, so paging goes
        on only while one more page is cheaper than polling the tasks still missing one by
        one, and never past the API's last page number.
        """
        self._sweeping = sweeping = anyio.Event()
        wanted = set(self.following)
        seen: set[str] = set()
        missing = len(wanted)
        try:
            for page in range(1, _MAX_PAGE + 1):
                tasks = await self._resource.list(page=page, page_size=_PAGE_SIZE)
                observed_at = time.monotonic()
                for index, task in enumerate(tasks, 1):
                    task_id = task.task_id
                    job = self.following.get(task_id)
                    if job is not None and task_id not in seen:
                        seen.add(task_id)
                        missing -= task_id in wanted
                        self._apply(job, task, observed_at)
                    if index % _YIELD_EVERY == 0:
                        await anyio.lowlevel.checkpoint()  # a page is big: let others run
                if len(tasks) < _PAGE_SIZE or missing <= page:
                    break
            self.sweeps += 1
            following = self.following
            self._missed_by_sweep = {following[i] for i in wanted - seen if i in following}
        except InvalidRequestError as exc:
            # The backend refuses the list endpoint (a gateway without it): stop trying.
            log.warning("list sweeps refused (%s); polling tasks one by one from now on", exc)
            self._list_sweep = False
        except KlingError as exc:
            self._sweep_failures += 1
            pause = min(600.0, self.policy.max_interval * 2 ** (self._sweep_failures - 1))
            self._sweeps_paused_until = time.monotonic() + pause
            log.warning("list sweep failed (%s); polling one by one for %.0f s", exc, pause)
        else:
            self._sweep_failures = 0
        finally:
            self._last_sweep = time.monotonic()
            self._sweeping = None
            sweeping.set()
        if trigger.task_id not in seen and not trigger.done:
            await self._poll(trigger)
